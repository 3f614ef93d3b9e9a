"""The training loop: explicit, nanoGPT-sized, the same for one process and for torchrun.

    data (validated) → model + adapter → tokenize → for each step:
        global batch → this process's micro-batches → loss / tokens in the global batch → backward
        → (all-reduce) → clip → AdamW → schedule → log / evaluate / checkpoint
    → adapter/ → evaluation (report.py) → loss.png

The loss of a step is the sum over the global batch's supervised tokens divided by their count,
wherever those tokens were computed. So one process with grad_accum=2 and two processes with
grad_accum=1 take the same step, and a resumed run continues the same sequence of steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import feathertune as ft
from feathertune.data import Tokenized, batch_indices, collate, read_examples, tokenize_examples
from feathertune.errors import ConfigError, FeathertuneError
from feathertune.files import write_atomic
from feathertune.models import load_model
from feathertune.train import distributed, state
from feathertune.train.config import TrainConfig
from feathertune.train.metrics import MetricsLog, plot_losses


class TrainingDiverged(FeathertuneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    output: Path
    adapter: Path
    steps: int
    metrics: dict  # eval.json's content


def run(config: TrainConfig, *, resume: bool = False, log=print) -> RunResult:
    """Fine-tune as `config` says and write the run directory (see README "Run directory").

    Args:
        resume: continue from the newest checkpoint in `config.output`.
        log: where progress lines go (rank 0 only).

    Raises:
        DataError: a data file has bad examples (nothing is written).
        ConfigError: a bad config, or an output directory that already holds another run.
        TrainingDiverged: the loss became non-finite.
    """
    procs = distributed.setup()
    say = log if procs.is_main else (lambda *_: None)
    try:
        return _run(config, resume, procs, say)
    finally:
        distributed.teardown(procs)


def _run(config: TrainConfig, resume: bool, procs: distributed.Processes, say) -> RunResult:
    out = Path(config.output)
    data_cfg, loop = config.data, config.train
    # 1. Data first: a bad file fails here, before anything is loaded or written.
    train_set, val_set = _read_data(config.data)
    task = _task(config.task, train_set.kind)
    existing = _check_output(out, resume)
    # 2. Model and adapter.
    model, tokenizer = _prepare_model(config, task, train_set.label_names, procs, say)

    # 3. Tokens and the step plan.
    train_tok = _tokenize("train", train_set, tokenizer, data_cfg.max_length, say)
    val_tok = _tokenize("validation", val_set, tokenizer, data_cfg.max_length, say) if val_set else None
    global_batch = loop.batch_size * loop.grad_accum * procs.world
    steps_per_epoch = math.ceil(len(train_tok.rows) / global_batch)
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * steps_per_epoch))

    optimizer = build_optimizer(loop, [p for p in model.parameters() if p.requires_grad], procs.device, say)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(loop.schedule, loop.warmup_steps, total_steps))
    start = 0
    if resume:
        step, path = existing[-1]
        state.load_checkpoint(path, model, optimizer, scheduler)
        start = step
        say(f"resuming from {path} (step {step} of {total_steps})")
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", config.to_yaml())
    metrics = MetricsLog(out / "metrics.jsonl", resume_from_step=start) if procs.is_main else None
    wrapped = _ddp(model, procs)

    # 4. Train.
    pad_id = tokenizer.pad_token_id
    progress = _progress(procs, start, total_steps)
    epoch_cache: dict[int, list[list[int]]] = {}
    t_last, tokens_since = time.perf_counter(), 0.0
    if val_tok is not None and loop.eval_every and start == 0 and metrics is not None:
        # The base model's validation loss: the curve's starting point in loss.png.
        metrics.write({"step": 0, "eval_loss": _validation_loss(model, val_tok, pad_id, task, config.eval.batch_size)})
    model.train()
    memory = PeakMemory(procs.device)
    started = time.perf_counter()
    for step in range(start, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: batch_indices(train_tok.lengths, global_batch, seed=loop.seed, epoch=epoch,
                                                shuffle=loop.shuffle, group_by_length=loop.group_by_length)}
        batch = epoch_cache[epoch][index % len(epoch_cache[epoch])]
        loss_sum, count, tokens = _train_step(wrapped, model, train_tok, batch, pad_id, task, loop, procs)
        loss_sum, count, tokens = distributed.sum_across(procs, [loss_sum, count, tokens])
        loss = loss_sum / max(count, 1)
        if distributed.broadcast_flag(procs, not math.isfinite(loss)):
            kept = state.checkpoints(out)
            where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss}; stopped ({where}). Lower train.lr "
                                   f"(now {loop.lr}) or set train.max_grad_norm, then --resume or start again.")
        if loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], loop.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_since += tokens
        if metrics is not None and (done % loop.log_every == 0 or done == total_steps):
            now = time.perf_counter()
            metrics.write({"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_since / max(now - t_last, 1e-9)})
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_since / max(now - t_last, 1e-9):.0f}")
            t_last, tokens_since = now, 0.0
        progress.update(1)
        if val_tok is not None and loop.eval_every and done % loop.eval_every == 0 and done != total_steps:
            eval_loss = _validation_loss(model, val_tok, pad_id, task, config.eval.batch_size)
            if metrics is not None:
                metrics.write({"step": done, "eval_loss": eval_loss})
            model.train()
        if loop.checkpoint_every and done % loop.checkpoint_every == 0 and done != total_steps and procs.is_main:
            state.save_checkpoint(out, done, model, optimizer, scheduler, loop.keep_checkpoints,
                                  {"epoch": epoch, "total_steps": total_steps})
        distributed.barrier(procs)
    progress.close()
    training = {"train_seconds": round(time.perf_counter() - started, 1), "peak_memory_mib": memory.peak_mib()}

    # 5. The adapter, then the evaluation and the report (main process only).
    adapter_dir = out / "adapter"
    result_metrics: dict = {}
    if procs.is_main:
        ft.save_adapter(model, adapter_dir)
        from feathertune.train.report import final_report

        result_metrics = final_report(model, tokenizer, config, task, val_set, val_tok, out, say,
                                      validation_loss=lambda: _validation_loss(model, val_tok, pad_id, task,
                                                                               config.eval.batch_size),
                                      training=training)
        if metrics is not None and "eval_loss" in result_metrics:
            metrics.write({"step": total_steps, "eval_loss": result_metrics["eval_loss"]})
        metrics.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{config.model} + {config.method}")
    distributed.barrier(procs)
    return RunResult(output=out, adapter=adapter_dir, steps=total_steps, metrics=result_metrics)


def _read_data(data_cfg):
    """Read and validate the training and validation files (every problem reported at once)."""
    train_set = read_examples(data_cfg.train, data_cfg.format, text_field=data_cfg.text_field,
                              label_field=data_cfg.label_field)
    val_set = None
    if data_cfg.validation:
        val_set = read_examples(data_cfg.validation, data_cfg.validation_format, text_field=data_cfg.text_field,
                                label_field=data_cfg.label_field, label_names=train_set.label_names)
        if data_cfg.max_validation:
            val_set.items = val_set.items[: data_cfg.max_validation]
    return train_set, val_set


def _check_output(out: Path, resume: bool) -> list[tuple[int, Path]]:
    """The run directory's checkpoints; refuses to overwrite a run or to resume from nothing."""
    existing = state.checkpoints(out)
    if resume and not existing:
        raise ConfigError(f"{out}: no checkpoint to resume from; run without --resume to start", source="resume")
    if not resume and (existing or (out / "adapter").exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another "
                          f"output (output=runs/NAME)", source="output")
    return existing


def _prepare_model(config: TrainConfig, task: str, label_names, procs: distributed.Processes, say):
    """Load the base (quantized if asked) onto this process's device and attach the adapter."""
    say(f"loading {config.model} …")
    model, tokenizer = load_model(config.model, task=task, label_names=label_names)
    model.to(procs.device)
    head = _classification_head(model) if task == "classification" else None
    if config.quantization:
        from feathertune.quant import quantize, quantized_bytes

        # On the device, so CUDA gets CUDA kernels; a new classification head trains in full.
        quantize(model, config.quantization, skip_modules=[head] if head else None)
        held = quantized_bytes(model)
        say(f"{config.quantization}: {held['layers']} linear layers in {held['bytes'] / 2**20:.1f} MiB "
            f"({held['bytes_per_parameter']:.3f} bytes per parameter)")
    lora = config.lora
    if head and not lora.modules_to_save:  # the new head starts random: it must train, and be saved too
        lora = dataclasses.replace(lora, modules_to_save=[head])
    torch.manual_seed(config.train.seed)  # the adapter's initialisation is part of the run's seed
    ft.attach(model, lora)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = ft.trainable_parameters(model)
    say(f"{config.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model, tokenizer


def _tokenize(name: str, examples, tokenizer, max_length: int, say) -> Tokenized:
    tokens = tokenize_examples(examples, tokenizer, max_length)
    if tokens.truncated or getattr(tokens, "dropped", 0):
        say(f"{name}: {tokens.truncated} examples truncated to {max_length} tokens, "
            f"{getattr(tokens, 'dropped', 0)} dropped (nothing left to learn from)")
    return tokens


def _train_step(wrapped, model, data: Tokenized, batch: list[int], pad_id: int, task: str, loop, procs):
    """Forward/backward this process's share of one global batch; returns (loss sum, count, tokens)."""
    share = _split(batch, procs.world)[procs.rank]
    weight = 1.0
    if not share:  # a short last batch: still take part in DDP's gradient all-reduce, contributing 0
        share, weight = batch[:1], 0.0
    micro = [m for m in _split(share, loop.grad_accum) if m]
    # Every process counts the whole global batch's targets itself: no communication needed.
    denominator = sum(_targets(data.rows[i], task) for i in batch)
    scale = weight * procs.world / max(denominator, 1)  # DDP averages gradients over processes
    loss_sum, tokens = 0.0, 0
    for k, indices in enumerate(micro):
        inputs = _to(collate([data.rows[i] for i in indices], pad_id), procs.device)
        last = k == len(micro) - 1
        sync = wrapped.no_sync() if procs.distributed and not last else contextlib.nullcontext()
        with sync:
            with _autocast(loop.precision, procs.device):
                summed = _loss_sum(wrapped, inputs, task)
            (summed * scale).backward()
        loss_sum += weight * summed.item()
        tokens += int(weight * inputs["attention_mask"].sum())
    return loss_sum, (denominator if procs.is_main else 0), tokens


def _classification_head(model: nn.Module) -> str | None:
    return next((n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)), None)


def build_optimizer(loop, params: list[nn.Parameter], device: torch.device, say) -> torch.optim.Optimizer:
    """AdamW, or one of bitsandbytes' 8-bit / paged variants (QLoRA's memory savers) where they apply."""
    name = loop.optimizer
    if name.startswith("paged_") and device.type != "cuda":
        # Paging moves optimizer state between GPU and CPU memory under pressure: nothing to page on a CPU.
        say(f"train.optimizer={name}: paging applies to CUDA memory only; on the CPU the optimizer is "
            f"{'adamw_8bit' if name.endswith('8bit') else 'adamw'}")
        name = "adamw_8bit" if name.endswith("8bit") else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={loop.optimizer} needs bitsandbytes: pip install bitsandbytes",
                          source="config") from None
    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return optimizers[name](params, lr=loop.lr, weight_decay=loop.weight_decay)


class PeakMemory:
    """Peak memory of the training phase: CUDA's allocator peak, or the process's peak RSS on the CPU
    (Linux's VmHWM, reset here so that loading and converting the model do not count)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # not Linux, or not allowed: the peak then includes loading
                pass

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous slices whose sizes differ by at most one (some empty if items are few)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _loss_sum(model, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Summed cross-entropy: over supervised tokens (causal LM) or examples (classification)."""
    if task == "classification":
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return F.cross_entropy(logits.float(), inputs["labels"], reduction="sum")
    labels = inputs["labels"]  # (B, T), -100 where there is no loss
    length = labels.shape[1]
    keep = _logits_needed(labels)
    kwargs = {"logits_to_keep": keep} if keep < length and _accepts_logits_to_keep(model) else {}
    # Only positions that predict a supervised token need the vocabulary-sized output head: with
    # prompts masked, that skips most of its cost (and its largest activations).
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs).logits
    kept = logits.shape[1]  # logits[:, j] is position length-kept+j and predicts the token after it
    targets = labels[:, length - kept + 1:]  # (B, kept-1)
    logits = logits[:, :-1]  # the last position predicts nothing
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def _logits_needed(labels: torch.Tensor) -> int:
    """How many trailing positions hold every logit that predicts a supervised token."""
    supervised = (labels != -100).any(dim=0).nonzero()
    if len(supervised) == 0:
        return labels.shape[1]
    first = int(supervised[0])  # the logit at first-1 predicts the first supervised token
    return labels.shape[1] - max(first - 1, 0)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _targets(row: dict, task: str) -> int:
    if task == "classification":
        return 1
    labels = row["labels"]
    return sum(1 for t in labels[1:] if t != -100)  # the first token is never predicted


@torch.no_grad()
def _validation_loss(model, data: Tokenized, pad_id: int, task: str, batch_size: int) -> float:
    """Mean cross-entropy per supervised token (per example for classification)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(data.rows)), key=lambda i: data.lengths[i])
    from tqdm.auto import tqdm

    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="validation loss", unit="batch", leave=False, file=sys.stderr,
                      disable=len(starts) < 8):
        indices = order[start:start + batch_size]
        inputs = _to(collate([data.rows[i] for i in indices], pad_id), device)
        total += _loss_sum(model, inputs, task).item()
        count += sum(_targets(data.rows[i], task) for i in indices)
    model.train(was_training)
    return total / max(count, 1)


def _task(task: str, kind: str) -> str:
    if task != "auto":
        if (task == "classification") != (kind == "classification"):
            raise ConfigError(f"task={task!r} does not fit the training data, which is {kind!r} data",
                              source="config")
        return task
    return "classification" if kind == "classification" else "causal_lm"


def _schedule(name: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at each step: linear warm-up, then the chosen decay."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if name == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def _ddp(model: nn.Module, procs: distributed.Processes):
    if not procs.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _progress(procs: distributed.Processes, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", disable=not procs.is_main,
                file=sys.stderr, dynamic_ncols=True)
