"""`feathertune bench speed`: LoRA training throughput and peak memory, feathertune against the
reference most people run — PEFT's `get_peft_model` + `model(..., labels=...).loss.backward()` +
AdamW — on the same model, the same examples and the same number of optimizer steps, in one run.

    feathertune bench speed [--model smollm2-135m-instruct] [--steps 8] [--batch 8] [--out bench/results]

Each contestant trains in a process of its own (so that peak resident memory is its own, and one
does not warm the other's caches), one after the other, never two at once. Both see the E2E chat
examples tokenized once with the chat template and the prompt masked, in the same batches, padded
to each batch's longest row; the reference is given those labels, so it, too, learns only the
answers. The first step's loss must agree (the same maths), which the report checks.

Reported: supervised examples per second over the measured steps (after a warm-up step), seconds
per step, peak RSS of the training process, and the ratios feathertune / reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# feathertune-bf16: bf16 autocast, run only where the CPU multiplies bf16 natively (AMX, AVX512-BF16; elsewhere
# emulated bf16 is several times slower, and the inference process reports fp32 and bf16 matmul rates instead);
# full: every weight trains (LoRA skips the weight gradients, 1/3 of the FLOPs, so 2/3 is its step's floor).
CONTESTANTS = ("peft", "trl", "feathertune", "feathertune-bf16", "peft-dora", "feathertune-dora", "full", "inference")
REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "e2e" / "train.jsonl"
SWEEP_LENGTHS, SWEEP_BATCHES = (128, 256, 512, 1024), (1, 2, 4, 8)  # at batch 4; at length 256


def run_speed(model: str, steps: int, batch: int, data: str | None, out: str | None, say=print) -> dict:
    """Train each contestant in its own process; returns (and writes, with --out) the comparison."""
    from feathertune.train.loop import resolved_precision

    import torch

    data = data or str(REPO_DATA)
    native_bf16 = resolved_precision("auto", torch.device("cpu")) == "bf16"
    results = {name: _measure(name, model, data, steps, batch, say) for name in CONTESTANTS
               if name != "feathertune-bf16" or native_bf16}
    inference = results.pop("inference")
    report = _compare(results, model, steps, batch)
    report["inference"] = inference
    if native_bf16:
        report["bf16_throughput_ratio"] = results["feathertune-bf16"]["examples_per_s"] / results["peft"]["examples_per_s"]
    report["lora_over_full_step"] = results["feathertune"]["seconds_per_step"] / results["full"]["seconds_per_step"]
    report["dora_over_lora_step"] = {who: results[f"{who}-dora"]["seconds_per_step"] / results[who]["seconds_per_step"]
                                     for who in ("feathertune", "peft")}
    say(_table(report))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _measure(name: str, model: str, data: str, steps: int, batch: int, say, length: int = 0) -> dict:
    """One contestant in a process of its own; `length` > 0: synthetic rows of that many tokens."""
    say(f"[bench speed] {name}: {steps} steps of batch {batch}{f' x {length} tokens' if length else ''} on {model} …")
    command = [sys.executable, "-m", "feathertune.speed", name, model, data, str(steps), str(batch), str(length)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_sweep(model: str, steps: int, data: str | None, out: str | None, say=print,
              lengths=SWEEP_LENGTHS, batches=SWEEP_BATCHES) -> dict:
    """Throughput and peak memory of PEFT's reference and feathertune against sequence length (at
    batch 4) and batch size (at 256 tokens): rows of exactly that length, the last 30% supervised."""
    data = data or str(REPO_DATA)
    points = [(4, n) for n in lengths] + [(b, 256) for b in batches if (b, 256) not in [(4, n) for n in lengths]]
    sweep = []
    for batch, length in points:
        row = {"batch": batch, "length": length}
        for name in ("peft", "feathertune"):
            r = _measure(name, model, data, steps, batch, say, length=length)
            row[name] = {"tokens_per_s": r["examples_per_s"] * length, "peak_rss_mib": r["peak_rss_mib"]}
        sweep.append(row)
    table = _sweep_table(sweep)
    say(table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
        (Path(out) / "sweep.md").write_text(table + "\n")
        _sweep_plot(sweep, Path(out) / "sweep.png")
    return {"sweep": sweep}


def _sweep_table(sweep: list[dict]) -> str:
    rows = ["| batch | tokens/row | PEFT tokens/s | feathertune tokens/s | ratio | PEFT peak MiB | feathertune peak MiB | ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for p in sweep:
        ref, ours = p["peft"], p["feathertune"]
        rows.append(f"| {p['batch']} | {p['length']} | {ref['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
                    f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}× | {ref['peak_rss_mib']:,.0f} | "
                    f"{ours['peak_rss_mib']:,.0f} | {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}× |")
    return "\n".join(rows)


def _sweep_plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (key, fixed, label) in enumerate((("length", ("batch", 4), "tokens per row (batch 4)"),
                                                  ("batch", ("length", 256), "batch size (256 tokens per row)"))):
        points = sorted((p for p in sweep if p[fixed[0]] == fixed[1]), key=lambda p: p[key])
        xs = [p[key] for p in points]
        for name, style in (("peft", "o--"), ("feathertune", "s-")):
            axes[0][column].plot(xs, [p[name]["tokens_per_s"] for p in points], style, label=name)
            axes[1][column].plot(xs, [p[name]["peak_rss_mib"] for p in points], style, label=name)
        axes[0][column].set_ylabel("training tokens / s")
        axes[1][column].set_ylabel("peak RSS (MiB)")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_xticks(xs, [str(x) for x in xs])
            axes[row][column].set_xlabel(label)
            axes[row][column].grid(alpha=0.3)
            axes[row][column].legend()
    fig.suptitle("LoRA r=16 on every linear layer, fp32: feathertune vs PEFT + model(labels=...).loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compare(results: dict, model: str, steps: int, batch: int) -> dict:
    ref, ours = results["peft"], results["feathertune"]
    first_loss_gap = abs(ref["losses"][0] - ours["losses"][0]) / abs(ref["losses"][0])
    return {"model": model, "steps": steps, "batch": batch, "torch_threads": ours["threads"], "results": results,
            "throughput_ratio": ours["examples_per_s"] / ref["examples_per_s"],
            "memory_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
            "first_loss_relative_gap": first_loss_gap}


def _table(report: dict) -> str:
    rows = [f"{'':17} {'examples/s':>11} {'s/step':>8} {'peak RSS MiB':>13} {'first loss':>11}"]
    for name, r in report["results"].items():
        rows.append(f"{name:17} {r['examples_per_s']:11.2f} {r['seconds_per_step']:8.2f} {r['peak_rss_mib']:13.0f} "
                    f"{r['losses'][0]:11.5f}")
    if "bf16_throughput_ratio" in report:
        rows.append(f"feathertune-bf16 / PEFT (fp32): throughput {report['bf16_throughput_ratio']:.2f}x (bf16 changes "
                    f"the numerics; not the like-for-like figure)")
    rates = report["inference"]["matmul_gflops"]
    rows.append(f"matmul rate on this CPU: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s "
                f"(train.precision: auto picks bf16 only where it is native)")
    dora = report["dora_over_lora_step"]
    rows.append(f"DoRA step / LoRA step: feathertune {dora['feathertune']:.2f}, PEFT {dora['peft']:.2f}")
    trl = report["results"]["trl"]
    rows.append(f"TRL SFTTrainer (+PEFT): {trl['examples_per_s']:.2f} examples/s; feathertune / TRL "
                f"{report['results']['feathertune']['examples_per_s'] / trl['examples_per_s']:.2f}x throughput, "
                f"{report['results']['feathertune']['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x memory")
    per_token = report["inference"]["seconds_per_token"]
    ratios = {k: v / per_token["base"] for k, v in per_token.items() if k != "base"}
    rows.append("greedy time per token / the base's: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
                + f" (base {1000 * per_token['base']:.1f} ms/token)")
    mixed = report["inference"]["mixed_batch_seconds"]
    rows.append(f"8 rows over 4 adapters / the same batch on one adapter: {mixed['four_adapters'] / mixed['one_adapter']:.2f}")
    rows.append(f"LoRA step / full fine-tuning step: {report['lora_over_full_step']:.2f} (the FLOP floor: 2/3 = 0.67)")
    rows.append(f"feathertune / PEFT: throughput {report['throughput_ratio']:.2f}x, peak memory "
                f"{report['memory_ratio']:.2f}x; first-step losses differ by {report['first_loss_relative_gap']:.1e} "
                f"(relative)")
    return "\n".join(rows)


# --- one contestant, in its own process ---------------------------------------------------------

def _rows(tokenizer, data: str, count: int) -> list[dict]:
    """The first `count` examples, tokenized with the chat template, prompts masked (-100)."""
    from feathertune.data import read_examples, tokenize_examples

    examples = read_examples(data)
    examples.items = examples.items[:count]
    return tokenize_examples(examples, tokenizer, 256).rows


def _batches(tokenizer, data: str, steps: int, batch: int) -> list[dict]:
    from feathertune.data import collate

    rows = _rows(tokenizer, data, (steps + 1) * batch)
    return [collate(rows[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps + 1)]


def _fixed_length_batches(tokenizer, data: str, steps: int, batch: int, length: int) -> list[dict]:
    """Rows of exactly `length` tokens cut from the E2E chat stream, the last 30% supervised."""
    import torch

    need = (steps + 1) * batch * length
    stream = [t for row in _rows(tokenizer, data, need // 50 + 1) for t in row["input_ids"]]  # rows: ~110 tokens
    stream = stream * (need // len(stream) + 1)  # a small data file repeats
    ids = torch.tensor(stream[:need]).view(steps + 1, batch, length)
    labels = ids.clone()
    labels[..., : int(0.7 * length)] = -100
    return [{"input_ids": ids[k], "attention_mask": torch.ones_like(ids[k]), "labels": labels[k]}
            for k in range(steps + 1)]


def _peft_step(model):
    def step(inputs):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     labels=inputs["labels"]).loss
    return step


def _feathertune_step(model, bf16: bool = False):
    import contextlib

    import torch

    from feathertune.loss import loss_sum

    def step(inputs):  # the training loop's own loss: summed over supervised tokens, over their count
        count = (inputs["labels"][:, 1:] != -100).sum()
        # train.precision: bf16 — autocast, as the loop does; the weights and AdamW stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return loss_sum(model, inputs) / count
    return step


def _contestant(name: str, model_name: str, data: str, steps: int, batch: int, length: int = 0) -> dict:
    import torch

    from feathertune.models import load_model
    from feathertune.train.loop import PeakMemory

    model, tokenizer = load_model(model_name)
    if name == "trl":
        return _trl_contestant(model, tokenizer, data, steps, batch)
    if name.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                           use_dora=name.endswith("dora")))
        step = _peft_step(model)
    elif name == "full":
        from feathertune.adapters import attach
        from feathertune.registry import resolve_method

        spec, preset = resolve_method("full")
        attach(model, spec.config_class(**preset))
        step = _feathertune_step(model)
    else:
        from feathertune.adapters import attach
        from feathertune.methods.lora import LoraConfig

        from feathertune.saved_activations import lean_gated_mlp

        attach(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear",
                                 use_dora=name.endswith("dora")))
        lean_gated_mlp(model)
        step = _feathertune_step(model, bf16=name.endswith("bf16"))
    batches = _batches(tokenizer, data, steps, batch) if not length else _fixed_length_batches(tokenizer, data, steps, batch,
                                                                                              length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    memory = PeakMemory(torch.device("cpu"))  # the training phase's peak, as the loop reports it: loading is alike
    model.train()
    losses, started = [], None
    for k, inputs in enumerate(batches):
        if k == 1:
            started = time.perf_counter()  # step 0 warms up (allocator, kernels); the rest is measured
        loss = step(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    return {"examples_per_s": steps * batch / seconds, "seconds_per_step": seconds / steps,
            "peak_rss_mib": memory.peak_mib(), "losses": losses, "threads": torch.get_num_threads()}


def _trl_contestant(model, tokenizer, data: str, steps: int, batch: int) -> dict:
    """TRL's SFTTrainer on the same tokenized rows (prompt masked through `completion_mask`), in the
    same order (sequential sampler), LoRA through its `peft_config`, fp32 (TRL defaults to bf16), AdamW at a constant 2e-4, no
    gradient clipping (the other contestants clip none either); timed from the end of the first step."""
    import tempfile

    import peft
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from feathertune.train.loop import PeakMemory

    rows = _rows(tokenizer, data, (steps + 1) * batch)
    dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                  "completion_mask": [int(t != -100) for t in r["labels"]]} for r in rows])
    marks: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["memory"] = PeakMemory(torch.device("cpu"))

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first", time.perf_counter())  # step 0 warms up, as for the others
            marks["last"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=2e-4,
                           lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                           optim="adamw_torch", logging_steps=1, report_to="none", save_strategy="no",
                           completion_only_loss=True, train_sampling_strategy="sequential", use_cpu=True,
                           dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False)  # TRL defaults to bf16
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                             callbacks=[Clock()])
        trainer.train()
    seconds = marks["last"] - marks["first"]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"examples_per_s": steps * batch / seconds, "seconds_per_step": seconds / steps,
            "peak_rss_mib": marks["memory"].peak_mib(), "losses": losses, "threads": torch.get_num_threads()}


def _inference(model_name: str, new_tokens: int = 32, rounds: int = 7) -> dict:
    """Greedy time per token: the base, LoRA unmerged and merged (feathertune and PEFT), and a batch
    of 8 rows over 4 adapters against the same batch on one adapter. Every variant is timed once per
    round, the rounds interleaved, and the median kept: a slow spell of the machine then hits all
    variants alike instead of whichever ran during it."""
    import copy

    import peft
    import torch

    from feathertune.adapters import attach, merge
    from feathertune.methods.lora import LoraConfig
    from feathertune.models import load_model

    base, tokenizer = load_model(model_name)
    base.eval()
    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    ours = attach(copy.deepcopy(base), lora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                       target_modules="all-linear"))
    models = {"base": base, "feathertune_unmerged": ours, "feathertune_merged": merge(copy.deepcopy(ours)),
              "peft_unmerged": theirs, "peft_merged": copy.deepcopy(theirs).merge_and_unload()}
    prompt = tokenizer("Write a one-sentence description of the restaurant: name[Aromi]", return_tensors="pt")

    def generate(model):
        return lambda: model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    per_token = {k: v / new_tokens for k, v in _interleaved_medians({k: generate(m) for k, m in models.items()},
                                                                     rounds).items()}
    del models, ours, theirs
    mixed = copy.deepcopy(base)
    for name in ("a", "b", "c", "d"):
        attach(mixed, lora, name=name)
    batch = torch.randint(0, tokenizer.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    forwards = _interleaved_medians({"one_adapter": lambda: mixed(input_ids=batch, adapter_names=["a"] * 8),
                                     "four_adapters": lambda: mixed(input_ids=batch, adapter_names=["a", "b", "c", "d"] * 2)},
                                    rounds)
    return {"seconds_per_token": per_token, "mixed_batch_seconds": forwards, "matmul_gflops": _matmul_rates()}


def _matmul_rates() -> dict[str, float]:
    """GFLOP/s of a (1024 × 576) · (576 × 1536) product, SmolLM2's MLP shape, in fp32 and bf16."""
    import torch

    rates = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, w = torch.randn(1024, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        seconds = _interleaved_medians({label: lambda: x @ w.T}, rounds=5)[label]
        rates[label] = 2 * 1024 * 576 * 1536 / seconds / 1e9
    return rates


def _interleaved_medians(work: dict, rounds: int) -> dict[str, float]:
    import statistics

    import torch

    times = {name: [] for name in work}
    with torch.inference_mode():
        for call in work.values():
            call()  # warm-up
        for _ in range(rounds):
            for name, call in work.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    name, model_name, data, steps, batch, length = sys.argv[1:7]
    measure = _inference(model_name) if name == "inference" else _contestant(name, model_name, data, int(steps),
                                                                                int(batch), int(length))
    print(json.dumps(measure))
