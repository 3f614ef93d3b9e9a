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

# feathertune-bf16: bf16 autocast (fast where the CPU has AMX); full: every weight trains (the step
# LoRA's is compared with: LoRA skips the weight gradients, 1/3 of the FLOPs, so 2/3 is its floor).
CONTESTANTS = ("peft", "feathertune", "feathertune-bf16", "full", "inference")
REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "e2e" / "train.jsonl"


def run_speed(model: str, steps: int, batch: int, data: str | None, out: str | None, say=print) -> dict:
    """Train each contestant in its own process; returns (and writes, with --out) the comparison."""
    data = data or str(REPO_DATA)
    results = {}
    for name in CONTESTANTS:
        say(f"[bench speed] {name}: {steps} steps of batch {batch} on {model} …")
        command = [sys.executable, "-m", "feathertune.speed", name, model, data, str(steps), str(batch)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    inference = results.pop("inference")
    report = _compare(results, model, steps, batch)
    report["inference"] = inference
    report["bf16_throughput_ratio"] = results["feathertune-bf16"]["examples_per_s"] / results["peft"]["examples_per_s"]
    report["lora_over_full_step"] = results["feathertune"]["seconds_per_step"] / results["full"]["seconds_per_step"]
    say(_table(report))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


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
    rows.append(f"feathertune-bf16 / PEFT (fp32): throughput {report['bf16_throughput_ratio']:.2f}x (bf16 changes "
                f"the numerics; not the like-for-like figure)")
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

def _batches(tokenizer, data: str, steps: int, batch: int) -> list[dict]:
    from feathertune.data import collate, read_examples, tokenize_examples

    examples = read_examples(data)
    examples.items = examples.items[: (steps + 1) * batch]
    tokens = tokenize_examples(examples, tokenizer, 256)
    rows = tokens.rows
    return [collate(rows[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps + 1)]


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


def _contestant(name: str, model_name: str, data: str, steps: int, batch: int) -> dict:
    import torch

    from feathertune.models import load_model
    from feathertune.train.loop import PeakMemory

    model, tokenizer = load_model(model_name)
    if name == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear"))
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

        attach(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
        lean_gated_mlp(model)
        step = _feathertune_step(model, bf16=name.endswith("bf16"))
    batches = _batches(tokenizer, data, steps, batch)
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
    return {"seconds_per_token": per_token, "mixed_batch_seconds": forwards}


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
    name, model_name, data, steps, batch = sys.argv[1:6]
    measure = _inference(model_name) if name == "inference" else _contestant(name, model_name, data, int(steps),
                                                                                int(batch))
    print(json.dumps(measure))
