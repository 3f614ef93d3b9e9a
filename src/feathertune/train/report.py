"""After training: score the base and the fine-tuned model on the validation set, and say so.

Writes eval.json and samples.md into the run directory and prints a short before/after summary:
BLEU (or accuracy) of the base and of the fine-tuned model, and a few answers side by side.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import torch

import feathertune as ft
from feathertune import evaluate
from feathertune.data import collate
from feathertune.files import write_atomic


def final_report(model, tokenizer, config, task: str, val_set, val_tok, out: Path, say, validation_loss,
                 training: dict | None = None) -> dict:
    """Evaluate, write eval.json and samples.md, print the summary; returns eval.json's content."""
    results: dict = {"model": config.model, "method": config.method, "quantize": config.quantization,
                     "task": task, **(training or {})}
    if val_set is None:
        results["note"] = "no validation file: set data.validation to measure the fine-tuned model"
        _write_eval(out, results)
        say(f"run directory: {out}")
        return results
    results["eval_loss"] = validation_loss()
    results["validation_examples"] = len(val_set.items)
    if task == "classification":
        device = next(model.parameters()).device
        batches = _batches(val_tok, tokenizer.pad_token_id, config.eval.batch_size, device)
        results["accuracy"] = evaluate.accuracy(model, _progress(batches, "fine-tuned accuracy"))
        if config.eval.compare_base:
            with ft.disabled(model):  # the base with its new, untrained head: chance level
                results["base_accuracy"] = evaluate.accuracy(model, _progress(batches, "base accuracy"))
        _write_eval(out, results)
        base = f"{100 * results['base_accuracy']:.1f}% (untrained head) → " if "base_accuracy" in results else ""
        say(f"validation accuracy: {base}{100 * results['accuracy']:.1f}% fine-tuned")
        say(f"run directory: {out}")
        return results

    conversations = val_set.conversations()
    references = val_set.references()
    gen = {"max_new_tokens": config.eval.max_new_tokens, "batch_size": config.eval.batch_size}
    tuned = evaluate.generate(model, tokenizer, conversations, desc="fine-tuned answers", **gen)
    results["bleu"] = evaluate.bleu(tuned, references)
    base = None
    if config.eval.compare_base:
        with ft.disabled(model):
            base = evaluate.generate(model, tokenizer, conversations, desc="base answers", **gen)
        results["base_bleu"] = evaluate.bleu(base, references)
    rows = [{"prompt": c[-1]["content"], "reference": r[0], "base": b, "tuned": t}
            for c, r, b, t in zip(conversations, references, base or [""] * len(tuned), tuned)]
    evaluate.write_samples(out / "samples.md", rows[: max(config.eval.samples, 10)])
    _write_eval(out, results)
    if base is not None:
        say(f"validation BLEU: base {results['base_bleu']:.1f} → fine-tuned {results['bleu']:.1f} "
            f"({results['bleu'] - results['base_bleu']:+.1f}); loss {results['eval_loss']:.3f}")
    else:
        say(f"validation BLEU: {results['bleu']:.1f}; loss {results['eval_loss']:.3f}")
    for row in rows[: config.eval.samples]:
        say(side_by_side(row))
    say(f"run directory: {out}  (adapter/, eval.json, samples.md, loss.png, metrics.jsonl)")
    return results


def side_by_side(row: dict) -> str:
    """Prompt on top, then base | fine-tuned in two columns, fitted to the terminal."""
    width = min(shutil.get_terminal_size((120, 24)).columns, 140)
    column = (width - 3) // 2
    left = textwrap.wrap(row["base"] or "(none)", column) or [""]
    right = textwrap.wrap(row["tuned"] or "(empty)", column) or [""]
    lines = [textwrap.shorten(row["prompt"], width, placeholder=" …"), "-" * width,
             f"{'base':<{column}} | fine-tuned", "-" * width]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{column}} | {b}")
    return "\n".join(lines) + "\n"


def _progress(batches: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=len(batches) < 8)


def _batches(data, pad_id: int, batch_size: int, device: torch.device | str = "cpu"):
    return [{k: v.to(device) for k, v in collate(data.rows[i:i + batch_size], pad_id).items()}
            for i in range(0, len(data.rows), batch_size)]


def evaluate_run(model_name: str, adapter: Path | None, *, data: str | None, config=None) -> dict:
    """`feathertune eval`: loss and BLEU (or accuracy) of an adapter on a data file."""
    from feathertune.data import read_examples, tokenize_examples
    from feathertune.errors import ConfigError
    from feathertune.models import load_model
    from feathertune.train.loop import _validation_loss

    path = data or (config.data.validation if config else None)
    if not path:
        raise ConfigError("no data to evaluate on: pass --data FILE", source="eval")
    fmt = config.data.validation_format if config and not data else "auto"
    examples = read_examples(path, fmt)
    task = "classification" if examples.kind == "classification" else "causal_lm"
    if task == "classification" and config:  # keep the label order of training
        examples = read_examples(path, fmt, label_names=read_examples(config.data.train).label_names)
    model, tokenizer = load_model(model_name, task=task, label_names=examples.label_names)
    if adapter is not None:
        ft.load_adapter(model, adapter)
    max_length = config.data.max_length if config else 512
    tokens = tokenize_examples(examples, tokenizer, max_length)
    results = {"data": str(path), "examples": len(examples.items),
               "loss": _validation_loss(model, tokens, tokenizer.pad_token_id, task, 16)}
    if task == "classification":
        results["accuracy"] = evaluate.accuracy(model, _batches(tokens, tokenizer.pad_token_id, 16))
    elif examples.kind == "chat":
        answers = evaluate.generate(model, tokenizer, examples.conversations())
        results["bleu"] = evaluate.bleu(answers, examples.references())
    return results


def _write_eval(out: Path, results: dict) -> None:
    write_atomic(out / "eval.json", json.dumps(results, indent=2) + "\n")
