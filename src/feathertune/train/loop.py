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
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from feathertune.adapters import (
    adapter_parameters,
    attach,
    disabled,
    merge,
    saved_module_names,
    trainable_parameters,
)
from feathertune.checkpoint import save_adapter
from feathertune.data import Tokenized, batch_indices, collate, read_examples, tokenize_examples
from feathertune.errors import ConfigError, FeathertuneError
from feathertune.files import write_atomic
from feathertune.models import load_model, save_model_directory
from feathertune.saved_activations import lean_gated_mlp
from feathertune import loss as objective
from feathertune.train import distributed, dpo, fsdp, state
from feathertune.train.config import TrainConfig, load_config, resume_changes
from feathertune.train.metrics import MetricsLog, plot_losses
from feathertune.train.report import final_report


FULL = "full"  # the method whose run also writes a plain model directory


class TrainingDiverged(FeathertuneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunStopped(FeathertuneError):
    """`stop()` asked the run to end early; it wrote a checkpoint at `step` first, so --resume
    continues from there exactly."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclasses.dataclass
class RunResult:
    output: Path
    adapter: Path
    steps: int
    metrics: dict  # eval.json's content


def run(config: TrainConfig, *, resume: bool = False, log=print, stop=None) -> RunResult:
    """Fine-tune as `config` says and write the run directory (see README "Run directory").

    Every check that does not need training (the config, the data files, whether they fit each
    other and the model, the run directory) runs before the run directory is created, so a failed
    check leaves nothing behind. A directory left by a run that failed before its first checkpoint
    holds no run (no checkpoint, no adapter), and a new run starts afresh in it.

    Args:
        resume: continue from the newest checkpoint in `config.output`. The run's saved config.yaml
            holds; `config` may differ from it only in the keys of train.config.RESUMABLE.
        log: where progress lines go (rank 0 only).
        stop: a callable asked after every step (e.g. a SIGTERM flag, the service's cancel and
            pause); when it returns True the run writes a checkpoint and raises RunStopped.

    Raises:
        DataError: a data file has bad examples (nothing is written).
        ConfigError: a bad config, data that does not fit it, an output directory that already
            holds another run, or a resume that would change the run.
        TrainingDiverged: the loss became non-finite.
        RunStopped: `stop()` returned True (a checkpoint was written first).
    """
    procs = distributed.setup()
    say = log if procs.is_main else (lambda *_: None)
    try:
        return _run(config, resume, procs, say, stop)
    finally:
        distributed.teardown(procs)


def _run(config: TrainConfig, resume: bool, procs: distributed.Processes, say, stop) -> RunResult:
    plan = _plan(config, resume, procs, say)
    training = _Training(plan, resume, procs, say)
    summary = training.train(stop)
    return training.finish(summary)


@dataclasses.dataclass
class _Plan:
    """What a run will do, settled (and checked) before anything is written."""

    config: TrainConfig  # as the run uses and saves it: absolute paths, task, labels
    task: str
    out: Path
    checkpoints: list[tuple[int, Path]]  # those already in `out` (a resume's)
    val_set: object | None
    model: nn.Module
    tokenizer: object
    train_tok: Tokenized
    val_tok: Tokenized | None
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def _plan(config: TrainConfig, resume: bool, procs: distributed.Processes, say) -> _Plan:
    """Everything that can be checked without training, then the model, its adapter and the tokens.
    A failed check leaves nothing behind: the run directory does not exist yet."""
    train_set, val_set = _read_data(config.data)
    task = _task(config.task, train_set, val_set, config.train.lp_steps, config.train.objective)
    config = _resolved(config, task, train_set)
    out, loop = Path(config.output), config.train
    existing = _check_output(out, resume)
    if resume:
        _check_resume(out, config, say)
    model, tokenizer = _prepare_model(config, task, procs, say)
    train_tok = _tokenize("train", train_set, tokenizer, config.data.max_length, say)
    val_tok = _tokenize("validation", val_set, tokenizer, config.data.max_length, say) if val_set else None
    global_batch = loop.batch_size * loop.grad_accum * procs.world
    steps_per_epoch = math.ceil(len(train_tok.rows) / global_batch)
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * steps_per_epoch))
    return _Plan(config, task, out, existing, val_set, model, tokenizer, train_tok, val_tok, global_batch,
                 steps_per_epoch, total_steps)


class _Training:
    """One run's optimizer, schedule, metrics log and checkpoints, stepped from its start (0, or
    the checkpoint it resumes) to the plan's last step."""

    def __init__(self, plan: _Plan, resume: bool, procs: distributed.Processes, say):
        self.plan, self.procs, self.say = plan, procs, say
        self.loop = loop = plan.config.train
        self.pad_id = plan.tokenizer.pad_token_id
        self.loss_fn = _objective(loop, plan.task)
        # Before the optimizer: FSDP replaces the parameters by their shards. (DDP: the probe's steps
        # leave the rest without grads.)
        self.wrapped = _wrap(plan.model, procs, loop.distributed, find_unused=loop.lp_steps > 0)
        self.sharded = fsdp.is_sharded(plan.model)  # then every forward takes every process
        params = [p for p in plan.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(loop, params, procs.device, say)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(loop.schedule, loop.warmup_steps, plan.total_steps))
        self.start = self._resume() if resume else 0
        measure_base = plan.val_tok is not None and loop.eval_every and self.start == 0 and \
            (procs.is_main or self.sharded)
        self.base_loss = None
        if measure_base and loop.objective == "dpo":
            self.base_loss = dpo.BASE_LOSS  # the base is DPO's reference: log 2 exactly, no pass needed
        elif measure_base:  # the base itself: an adapter that is not zero-initialised (prompts) already differs
            with disabled(plan.model):
                self.base_loss = self.validation_loss()
        self.metrics = _open_run_directory(plan.out, plan.config, self.start if resume else None, procs)
        if self.base_loss is not None and self.metrics is not None:
            self.metrics.write({"step": 0, "eval_loss": self.base_loss})  # the curve's starting point in loss.png
        self.probe = LinearProbe(plan.model, loop.lp_steps)
        self.batches = _EpochBatches(plan.train_tok.lengths, plan.global_batch, plan.steps_per_epoch, loop)
        self.throughput = _Throughput()

    def _resume(self) -> int:
        step, path = _resume_point(self.plan.out, self.plan.checkpoints, self.plan.total_steps, self.loop)
        state.load_checkpoint(path, self.plan.model, self.optimizer, self.scheduler)
        self.say(f"resuming from {path} (step {step} of {self.plan.total_steps})")
        return step

    def validation_loss(self) -> float:
        plan = self.plan
        return objective.mean_loss(plan.model, plan.val_tok, self.pad_id, plan.task, plan.config.eval.batch_size,
                                   (lambda model, inputs: self.loss_fn(model, inputs)[0]) if self.loop.objective == "dpo"
                                   else None)

    def train(self, stop) -> dict:
        """Every remaining step; returns the training phase's time and peak memory."""
        plan = self.plan
        progress = _progress(self.procs, self.start, plan.total_steps)
        plan.model.train()
        memory = PeakMemory(self.procs.device)
        started = time.perf_counter()
        for step in range(self.start, plan.total_steps):
            loss, tokens, stats = self.step(step)
            done = step + 1
            self.log(done, loss, tokens, progress, stats)
            progress.update(1)
            self.evaluate(done)
            if self.checkpoint(done, stop):
                progress.close()
                if self.metrics is not None:
                    self.metrics.close()
                raise RunStopped(done, plan.out / "checkpoints" / f"step-{done:06d}")
        progress.close()
        return {"train_seconds": round(time.perf_counter() - started, 1), "peak_memory_mib": memory.peak_mib(),
                "trainable_parameters": trainable_parameters(plan.model)[0]}

    def step(self, step: int) -> tuple[float, float, dict]:
        """One optimizer step on the global batch of `step`; returns its loss, its tokens and the
        objective's other figures (DPO's rewards), each a mean over the batch's pairs."""
        plan, procs, loop = self.plan, self.procs, self.loop
        self.probe.before_step(step)
        loss_sum, count, tokens, stats = _train_step(self.wrapped, plan.train_tok, self.batches.at(step), self.pad_id,
                                                     self.loss_fn, loop, procs)
        loss_sum, count, tokens, *sums = distributed.sum_across(procs, [loss_sum, count, tokens, *stats.values()])
        loss = loss_sum / max(count, 1)
        stats = {key: value / max(count, 1) for key, value in zip(stats, sums)}
        if distributed.broadcast_flag(procs, not math.isfinite(loss)):
            kept = state.checkpoints(plan.out)
            where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss}; stopped ({where}). Lower train.lr "
                                   f"(now {loop.lr}) or set train.max_grad_norm, then --resume or start again.")
        if loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in plan.model.parameters() if p.requires_grad], loop.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, tokens, stats

    def log(self, done: int, loss: float, tokens: float, progress, stats: dict) -> None:
        """A metrics.jsonl record every log_every steps (and at the end), with the tokens since the last."""
        self.throughput.add(tokens)
        if self.metrics is None or not (done % self.loop.log_every == 0 or done == self.plan.total_steps):
            return
        count, per_second = self.throughput.take()
        self.metrics.write({"step": done, "epoch": round(done / self.plan.steps_per_epoch, 4), "loss": loss, **stats,
                            "lr": self.scheduler.get_last_lr()[0], "tokens": count, "tokens_per_s": per_second})
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{per_second:.0f}")

    def evaluate(self, done: int) -> None:
        """The validation loss every eval_every steps (the last step's comes with the report)."""
        if self.plan.val_tok is None or not self.loop.eval_every or done % self.loop.eval_every or \
                done == self.plan.total_steps:
            return
        eval_loss = self.validation_loss()
        if self.metrics is not None:
            self.metrics.write({"step": done, "eval_loss": eval_loss})
        self.plan.model.train()

    def checkpoint(self, done: int, stop) -> bool:
        """Write a checkpoint every checkpoint_every steps, and when `stop()` asks for the run to
        end (then True). The last step writes the adapter instead."""
        plan, procs, loop = self.plan, self.procs, self.loop
        due = loop.checkpoint_every and done % loop.checkpoint_every == 0
        stopping = stop is not None and done != plan.total_steps and distributed.broadcast_flag(procs, bool(stop()))
        if (due or stopping) and done != plan.total_steps:
            extra = {"epoch": (done - 1) // plan.steps_per_epoch, "total_steps": plan.total_steps}
            with fsdp.gathered(plan.model):  # a sharded run: every process gathers the full tensors, rank 0 writes
                optimizer_state = fsdp.full_optimizer_state(self.optimizer)
                if procs.is_main:
                    state.save_checkpoint(plan.out, done, plan.model, optimizer_state, self.scheduler,
                                          max(loop.keep_checkpoints, 1), extra)
        distributed.barrier(procs)
        return stopping

    def finish(self, training: dict) -> RunResult:
        """The adapter, then the evaluation, the report and the loss plot (main process only; a
        sharded model is evaluated by every process together, and only the main one writes)."""
        plan, procs = self.plan, self.procs
        config, out = plan.config, plan.out
        adapter_dir = out / "adapter"
        result_metrics: dict = {}
        with fsdp.gathered(plan.model):
            if procs.is_main:
                save_adapter(plan.model, adapter_dir)
        if self.sharded and not procs.is_main:
            with tempfile.TemporaryDirectory() as scratch:  # its copy of eval.json and samples.md
                self.report(training, Path(scratch))
        if procs.is_main:
            result_metrics = self.report(training, out)
            if self.metrics is not None and "eval_loss" in result_metrics:
                self.metrics.write({"step": plan.total_steps, "eval_loss": result_metrics["eval_loss"]})
            self.metrics.close()
            plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{config.model} + {config.method}")
            if config.method == FULL and self.sharded:  # one process cannot gather a sharded base alone
                self.say(f"a sharded run writes no model/: `feathertune merge --adapter {out} --out {out / 'model'}` "
                         f"writes it from adapter/, which holds every trained tensor")
            elif config.method == FULL:  # what people deploy a full fine-tune as: a plain model directory
                save_model_directory(merge(plan.model), plan.tokenizer, out / "model")
                self.say(f"full model written to {out / 'model'} (transformers' from_pretrained loads it)")
        distributed.barrier(procs)
        return RunResult(output=out, adapter=adapter_dir, steps=plan.total_steps, metrics=result_metrics)

    def report(self, training: dict, out: Path) -> dict:
        plan = self.plan
        return final_report(plan.model, plan.tokenizer, plan.config, plan.task, plan.val_set, plan.val_tok, out,
                            self.say, validation_loss=self.validation_loss, base_eval_loss=self.base_loss,
                            training=training)


def _objective(loop, task: str):
    """The training objective as `(model, inputs) -> (summed loss, {figure: sum over pairs})`."""
    options = {"sparse_head": loop.sparse_head, "mask_free_attention": loop.mask_free_attention}
    if loop.objective == "dpo":
        return lambda model, inputs: dpo.dpo_loss_sum(model, inputs, loop.dpo_beta, **options)
    return lambda model, inputs: (objective.loss_sum(model, inputs, task, **options), {})


class _EpochBatches:
    """The global batch of each step: each epoch's order drawn once (seeded by the epoch, so a
    resumed run draws the same), the current epoch's kept."""

    def __init__(self, lengths: list[int], global_batch: int, steps_per_epoch: int, loop):
        self.lengths, self.global_batch, self.steps_per_epoch, self.loop = lengths, global_batch, steps_per_epoch, loop
        self.epoch, self.order = None, []

    def at(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            loop = self.loop
            self.order = batch_indices(self.lengths, self.global_batch, seed=loop.seed, epoch=epoch,
                                       shuffle=loop.shuffle, group_by_length=loop.group_by_length)
            self.epoch = epoch
        return self.order[index % len(self.order)]


class _Throughput:
    """Tokens since the last log line, and their rate."""

    def __init__(self):
        self.since, self.tokens = time.perf_counter(), 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def take(self) -> tuple[int, float]:
        now = time.perf_counter()
        count, rate = int(self.tokens), self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0.0
        return count, rate


def _read_data(data_cfg):
    """Read and validate the training and validation files (every problem reported at once)."""
    train_set = read_examples(data_cfg.train, data_cfg.format, text_field=data_cfg.text_field,
                              label_field=data_cfg.label_field, label_names=data_cfg.labels)
    val_set = None
    if data_cfg.validation:
        val_set = read_examples(data_cfg.validation, data_cfg.validation_format, text_field=data_cfg.text_field,
                                label_field=data_cfg.label_field, label_names=train_set.label_names)
        if data_cfg.max_validation:
            val_set.items = val_set.items[: data_cfg.max_validation]
    return train_set, val_set


def _task(task: str, train_set, val_set, lp_steps: int = 0, objective_name: str = "sft") -> str:
    """The run's task from the config and the training data; refuses data that does not fit it."""
    classifying = train_set.kind == "classification"
    problems = _objective_problems(objective_name, train_set, val_set)
    if task != "auto" and (task == "classification") != classifying:
        problems.append(f"task={task!r} does not fit the training data {train_set.path}, which holds "
                        f"{train_set.kind} examples (format {train_set.format})")
    if val_set is not None and (val_set.kind == "classification") != classifying:
        problems.append(f"the validation file {val_set.path} holds {val_set.kind} examples (format "
                        f"{val_set.format}), but the training file {train_set.path} holds {train_set.kind} "
                        f"examples; validate on data of the training data's kind")
    if lp_steps and not classifying:
        problems.append(f"train.lp_steps={lp_steps} trains a new task head first (LP-FT), and a causal LM has "
                        f"none: the training data {train_set.path} is {train_set.kind}; set train.lp_steps=0")
    if classifying and len(train_set.label_names) < 2:
        problems.append(f"every example of {train_set.path} has the label {train_set.label_names[0]!r}; a "
                        f"classifier needs at least two (list them all in data.labels if some are missing)")
    if problems:
        raise ConfigError(problems, source="data")
    return "classification" if classifying else "causal_lm"


def _objective_problems(objective_name: str, train_set, val_set) -> list[str]:
    """DPO learns from preference pairs, and only from them; its validation file holds pairs too."""
    pairs = train_set.kind == "preference"
    if objective_name == "dpo" and not pairs:
        return [f"train.objective=dpo learns from preference pairs, but {train_set.path} holds {train_set.kind} "
                f"examples (format {train_set.format}); give a file of lines like {{\"input\": {{\"messages\": "
                f"[...]}}, \"preferred_output\": [...], \"non_preferred_output\": [...]}}"]
    if pairs and objective_name != "dpo":
        return [f"{train_set.path} holds preference pairs, which train.objective={objective_name} does not learn "
                f"from; set train.objective=dpo"]
    if not pairs and val_set is not None and val_set.kind == "preference":
        return [f"the validation file {val_set.path} holds preference pairs, but the training file {train_set.path} "
                f"holds {train_set.kind} examples; validate on data of the training data's kind"]
    if pairs and val_set is not None and val_set.kind != "preference":
        return [f"the validation file {val_set.path} holds {val_set.kind} examples (format {val_set.format}), "
                f"but DPO is validated on preference pairs like its training file {train_set.path}"]
    return []


def _resolved(config: TrainConfig, task: str, train_set) -> TrainConfig:
    """The config as the run uses and saves it: absolute paths, the task and the label order."""
    data = dataclasses.replace(config.data, labels=train_set.label_names if task == "classification" else None)
    return dataclasses.replace(config.with_absolute_paths(), task=task, data=data)


def _check_output(out: Path, resume: bool) -> list[tuple[int, Path]]:
    """The run directory's checkpoints; refuses to overwrite a run or to resume from nothing."""
    existing = state.checkpoints(out)
    if resume and not existing:
        raise ConfigError(f"{out}: no checkpoint to resume from; run without --resume to start", source="resume")
    if not resume and (existing or (out / "adapter").exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another "
                          f"output (output=runs/NAME)", source="output")
    return existing


def _check_resume(out: Path, config: TrainConfig, say) -> None:
    """Refuse a resume that would change the run saved in `out`; say what it may change."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{out}: has checkpoints but no config.yaml; cannot tell what run they belong to",
                          source="resume")
    saved = dataclasses.replace(load_config(saved_path), output=str(out))
    for key, (old, new) in resume_changes(saved, config).items():
        say(f"changed on resume: {key}: {old} → {new}")


def _resume_point(out: Path, existing: list[tuple[int, Path]], total_steps: int, loop) -> tuple[int, Path]:
    """(step, path) of the checkpoint to resume from, if this config continues past it."""
    step, path = existing[-1]
    length = f"train.max_steps={loop.max_steps}" if loop.max_steps else f"train.epochs={loop.epochs}"
    if (out / "adapter").exists():
        finished = state.read_record(path).get("total_steps", step)
        if total_steps <= finished:
            raise ConfigError(f"{out} already finished after {finished} steps (its adapter is in "
                              f"{out / 'adapter'}); to train it longer, resume with train.max_steps=N, N > "
                              f"{finished} ({length} gives {total_steps} steps)", source="resume")
    if step >= total_steps:
        raise ConfigError(f"the newest checkpoint of {out} is at step {step}, but {length} trains {total_steps} "
                          f"steps: resuming can extend a run, not shorten it", source="resume")
    return step, path


def _open_run_directory(out: Path, config: TrainConfig, resumed_step: int | None, procs) -> MetricsLog | None:
    """Create the run directory with its config.yaml and open metrics.jsonl (main process only).

    A resumed run's log keeps its records up to `resumed_step`; a new run's log starts empty.
    """
    if not procs.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", config.to_yaml())
    return MetricsLog(out / "metrics.jsonl", resume_from_step=resumed_step)


def _prepare_model(config: TrainConfig, task: str, procs: distributed.Processes, say):
    """Load the base (quantized if asked) onto this process's device and attach the adapter."""
    say(f"loading {config.model} …")
    model, tokenizer = load_model(config.model, task=task, label_names=config.data.labels)
    model.to(procs.device)
    head = _classification_head(model) if task == "classification" else None
    if config.quantization:
        from feathertune.quant import quantize, quantized_bytes

        # On the device, so CUDA gets CUDA kernels; a new classification head trains in full.
        # FSDP shards floats: a sharded run stores the 4-bit codes as float32, the compute dtype.
        storage = torch.float32 if procs.distributed and config.train.distributed == "fsdp" else torch.uint8
        quantize(model, config.quantization, skip_modules=[head] if head else None, quant_storage=storage)
        held = quantized_bytes(model)
        say(f"{config.quantization}: {held['layers']} linear layers in {held['bytes'] / 2**20:.1f} MiB "
            f"({held['bytes_per_parameter']:.3f} bytes per parameter)")
    adapter = config.adapter
    if head and not getattr(adapter, "modules_to_save", None):
        # The new head starts random: it must train, and be saved with the adapter too.
        if not hasattr(adapter, "modules_to_save"):
            raise ConfigError(f"method={config.method} cannot train a classifier: it has no modules_to_save "
                              f"for the new head {head!r}; use it on a causal LM, or pick another method",
                              source="method")
        adapter = dataclasses.replace(adapter, modules_to_save=[head])
    torch.manual_seed(config.train.seed)  # the adapter's initialisation is part of the run's seed
    attach(model, adapter)
    if config.train.gradient_checkpointing:  # recomputes whole blocks: a lean MLP would save nothing more
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.train.lean_mlp:
        lean_gated_mlp(model)
    if config.train.precision == "auto":
        say(f"train.precision: auto → {resolved_precision('auto', procs.device)} on this {procs.device.type}")
    trainable, total = trainable_parameters(model)
    say(f"{config.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if config.train.objective == "dpo" and trainable > total // 4:
        say(f"warning: DPO's reference is the base, which {config.method} keeps frozen beside the "
            f"{trainable:,} parameters it trains: their weights are in memory twice (as with any DPO of a full "
            f"model, which needs a reference copy); an adapter method (lora) needs no second copy")
    if trainable > total // 4:
        say(_size_warning(config, model, trainable))
    return model, tokenizer


def _size_warning(config: TrainConfig, model: nn.Module, trainable: int) -> str:
    """What training this many parameters costs in memory and on disk (said before it starts)."""
    size = next(p for p in model.parameters() if p.requires_grad).element_size()
    gib = trainable * size * 4 / 2**30  # the trained copy, its gradient and AdamW's two moments
    files = 2 if config.method == FULL else 1  # adapter/ (+ model/)
    return (f"warning: {config.method} trains {trainable:,} parameters: about {gib:.1f} GiB for them, their "
            f"gradients and AdamW's state, beside the frozen base; each checkpoint holds about {2 * gib:.1f} "
            f"GiB and the run directory about {files * trainable * size / 2**30:.1f} GiB more. LoRA (method: "
            f"lora) trains ~1% of that.")


class LinearProbe:
    """LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
    Out-of-Distribution"): before step `steps`, only the task head (the modules_to_save) trains."""

    def __init__(self, model: nn.Module, steps: int):
        self.steps = steps
        self.probing: bool | None = None  # the phase the flags are set for; None: not set yet
        head = {id(p) for n in saved_module_names(model, "default")
                for p in model.get_submodule(n).adapter_parameters("default")}
        self.rest = [p for p in adapter_parameters(model, "default") if id(p) not in head]
        if steps and not head:
            raise ConfigError(f"train.lp_steps={steps}: this run has no task head to probe with first; set "
                              f"train.lp_steps=0", source="train.lp_steps")

    def before_step(self, step: int) -> None:
        """Freeze the rest for the probe's steps, then let it train (a resumed run lands in either).
        The flags change only where the phase does, not on every step."""
        probing = step < self.steps
        if self.steps and probing != self.probing:
            for param in self.rest:
                param.requires_grad_(not probing)
            self.probing = probing


def _tokenize(name: str, examples, tokenizer, max_length: int, say) -> Tokenized:
    tokens = tokenize_examples(examples, tokenizer, max_length)
    if tokens.truncated or getattr(tokens, "dropped", 0):
        say(f"{name}: {tokens.truncated} examples truncated to {max_length} tokens, "
            f"{getattr(tokens, 'dropped', 0)} dropped (nothing left to learn from)")
    return tokens


def _train_step(wrapped, data: Tokenized, batch: list[int], pad_id: int, loss_fn, loop, procs):
    """Forward/backward this process's share of one global batch; returns (loss sum, count, tokens,
    the objective's other sums)."""
    share = _split(batch, procs.world)[procs.rank]
    weight = 1.0
    if not share:  # a short last batch: still take part in DDP's and FSDP's collectives, contributing 0
        share, weight = batch[:1], 0.0
    micro = [m for m in _split(share, loop.grad_accum) if m]
    # Every process counts the whole global batch's targets itself: no communication needed.
    denominator = sum(objective.target_count(data.rows[i], data.kind) for i in batch)
    scale = weight * procs.world / max(denominator, 1)  # DDP and FSDP average gradients over processes
    summed_loss, tokens, stats = 0.0, 0, {}
    for k, indices in enumerate(micro):
        inputs = _to(collate([data.rows[i] for i in indices], pad_id), procs.device)
        last = k == len(micro) - 1
        # DDP all-reduces on the last micro-batch only; FSDP reduce-scatters each, to keep gradients sharded.
        sync = wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) and not last else \
            contextlib.nullcontext()
        with sync:
            with _autocast(loop.precision, procs.device):
                summed, figures = loss_fn(wrapped, inputs)
            (summed * scale).backward()
        summed_loss += weight * summed.item()
        stats = {key: stats.get(key, 0.0) + weight * value for key, value in figures.items()}
        tokens += int(weight * inputs["attention_mask"].sum())
    return summed_loss, (denominator if procs.is_main else 0), tokens, stats


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


def _wrap(model: nn.Module, procs: distributed.Processes, how: str, find_unused: bool = False):
    """The model as the training step calls it: itself in one process; under torchrun, DDP's
    wrapper, or (train.distributed=fsdp) the model itself, its parameters sharded in place."""
    if not procs.distributed:
        return model
    if how == "fsdp":
        return fsdp.shard(model)
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def _autocast(precision: str, device: torch.device):
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolved_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 where the device multiplies bf16 natively (CUDA with bf16 support; a CPU with
    AMX tiles or AVX512-BF16), else fp32: emulated bf16 matmuls run several times slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _progress(procs: distributed.Processes, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", disable=not procs.is_main,
                file=sys.stderr, dynamic_ncols=True)
