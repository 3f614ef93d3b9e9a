"""After training: score the base and the fine-tuned model on the validation set, and say so.

Writes eval.json and samples.md into the run directory and prints a one-line before/after summary
of the base and the fine-tuned model (validation loss, and accuracy or BLEU, chrF and exact match),
then a few answers side by side.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import torch

from feathertune import evaluate
from feathertune.adapters import disabled
from feathertune.checkpoint import load_adapter
from feathertune.data import collate
from feathertune.errors import ConfigError
from feathertune.files import write_atomic
from feathertune.loss import mean_loss
from feathertune.train import dpo
from feathertune.train.config import LoopConfig


def final_report(model, tokenizer, config, task: str, val_set, val_tok, out: Path, say, validation_loss,
                 base_eval_loss: float | None = None, training: dict | None = None) -> dict:
    """Evaluate, write eval.json and samples.md, print the summary; returns eval.json's content.
    Preference pairs (DPO) are scored by preference accuracy: the share of pairs whose preferred answer
    the model gives the higher log-probability.

    Args:
        validation_loss: () -> the validation loss of the model as it is (adapters on or off).
        base_eval_loss: the base's validation loss, if training already measured it (at step 0).
    """
    results: dict = {"model": config.model, "method": config.method, "quantize": config.quantization,
                     "task": task, **(training or {})}
    if val_set is None:
        results["note"] = "no validation file: set data.validation to measure the fine-tuned model"
        _write_eval(out, results)
        say(f"run directory: {out}")
        return results
    results["validation_examples"] = len(val_set.items)
    compare, rows = config.eval.compare_base, []
    if val_set.kind == "preference":  # one pass gives the loss and which answer of each pair ranks higher, base too
        device = next(model.parameters()).device
        batches = _batches(val_tok, tokenizer.pad_token_id, config.eval.batch_size, device)
        results.update(dpo.validation_scores(model, _progress(batches, "validation pairs"), config.train.dpo_beta,
                                             compare))
    else:
        results.update(_validation_losses(model, validation_loss, compare, base_eval_loss))
    if task == "classification":
        device = next(model.parameters()).device
        batches = _batches(val_tok, tokenizer.pad_token_id, config.eval.batch_size, device)
        results["accuracy"] = evaluate.accuracy(model, _progress(batches, "fine-tuned accuracy"))
        if compare:
            with disabled(model):  # the base with its new, untrained head: chance level
                results["base_accuracy"] = evaluate.accuracy(model, _progress(batches, "base accuracy"))
    elif val_set.kind == "chat":
        rows = _score_answers(model, tokenizer, val_set, config.eval, results)
        if config.eval.samples:
            evaluate.write_samples(out / "samples.md", rows[: config.eval.samples])
    _write_eval(out, results)
    say(summary_line(results))
    for row in rows[: config.eval.samples]:
        say(side_by_side(row))
    written = ", ".join(n for n in ("adapter/", "eval.json", "samples.md", "loss.png", "metrics.jsonl")
                        if n != "samples.md" or (out / n).exists())
    say(f"run directory: {out}  ({written})")
    return results


def _validation_losses(model, validation_loss, compare: bool, base_eval_loss: float | None) -> dict:
    """The tuned model's validation loss, and the base's (measured at step 0 already, or now)."""
    losses = {"eval_loss": validation_loss()}
    if compare and base_eval_loss is not None:
        losses["base_eval_loss"] = base_eval_loss
    elif compare:
        with disabled(model):
            losses["base_eval_loss"] = validation_loss()
    return losses


def answer_scores(answers: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU, chrF and exact match of generated answers: BLEU alone reads 0 for short right answers."""
    return {"bleu": evaluate.bleu(answers, references), "chrf": evaluate.chrf(answers, references),
            "exact_match": evaluate.exact_match(answers, references)}


def _score_answers(model, tokenizer, val_set, eval_config, results: dict) -> list[dict]:
    """Generate the fine-tuned (and base) answers, add their scores to `results`; returns sample rows."""
    conversations, references = val_set.conversations(), val_set.references()
    gen = {"max_new_tokens": eval_config.max_new_tokens, "batch_size": eval_config.batch_size}
    tuned = evaluate.generate(model, tokenizer, conversations, desc="fine-tuned answers", **gen)
    results.update(answer_scores(tuned, references))
    base = None
    if eval_config.compare_base:
        with disabled(model):
            base = evaluate.generate(model, tokenizer, conversations, desc="base answers", **gen)
        results.update({f"base_{k}": v for k, v in answer_scores(base, references).items()})
    return [{"prompt": c[-1]["content"], "reference": r[0], "base": b, "tuned": t}
            for c, r, b, t in zip(conversations, references, base or [""] * len(tuned), tuned)]


def summary_line(results: dict) -> str:
    """One line with every validation score, base → fine-tuned where the base was scored:
    `validation (base → fine-tuned): BLEU 13.7 → 65.4 (+51.7) · chrF … · exact match … · loss …`."""
    shown = [("accuracy", "accuracy", "{:.1%}"), ("preference_accuracy", "preference accuracy", "{:.1%}"),
             ("bleu", "BLEU", "{:.1f}"), ("chrf", "chrF", "{:.1f}"),
             ("exact_match", "exact match", "{:.1%}"), ("eval_loss", "loss", "{:.3f}")]
    parts = []
    for key, label, form in shown:
        if key not in results:
            continue
        tuned = form.format(results[key])
        base = results.get("base_" + key)
        if base is None:
            parts.append(f"{label} {tuned}")
        elif key in ("bleu", "chrf"):
            parts.append(f"{label} {form.format(base)} → {tuned} ({results[key] - base:+.1f})")
        else:
            parts.append(f"{label} {form.format(base)} → {tuned}")
    compared = any(k.startswith("base_") for k in results)
    head = "validation (base → fine-tuned)" if compared else "validation"
    if "accuracy" in results and compared:
        head += "; the base has the new, untrained head"
    return f"{head}: " + " · ".join(parts)


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
    """Batches of similar lengths (accuracy does not depend on the order): far less padding to run."""
    order = sorted(range(len(data.rows)), key=lambda i: data.lengths[i])
    return [{k: v.to(device) for k, v in collate([data.rows[i] for i in order[start:start + batch_size]],
                                                  pad_id).items()}
            for start in range(0, len(order), batch_size)]


def evaluate_run(model_name: str, adapter: Path | None, *, data: str, data_format: str = "auto",
                 max_length: int = 512, label_names: list[str] | None = None, quantize: str | None = None,
                 batch_size: int = 16, max_new_tokens: int = 64, alphas: list[float] | None = None,
                 forgetting: bool = False, general: str | None = None) -> dict:
    """`feathertune eval`: the loss, and accuracy (classification) or BLEU, chrF and exact match
    (chat), of a base model with or without an adapter on a data file.

    Args:
        label_names: classification labels in the order the adapter's head was trained with; left
            out, the data file's labels, sorted.
        alphas: WiSE-FT: score the interpolation (1 − α)·base + α·fine-tune for each α instead
            (results["interpolation"], one entry per α).
        forgetting: also measure forgetting on general text (`evaluate.forgetting`): results["forgetting"],
            or each α's entry["forgetting"] against the α = 0 model (the base, scored once).
        general: the general-text file (one paragraph a line; implies `forgetting`); None: the shipped
            WikiText sample.

    Raises:
        ConfigError: forgetting asked of a base model alone (no adapter: nothing to compare).
    """
    from feathertune.data import read_examples, tokenize_examples
    from feathertune.models import load_model

    texts = None
    if forgetting or general is not None:
        if adapter is None:
            raise ConfigError(f"forgetting compares a fine-tune with its base, and {model_name} is a base model "
                              f"alone; give a run or adapter directory (a full fine-tune's run holds one too)",
                              source="eval")
        texts = evaluate.general_text(general)  # before loading anything: a missing file fails at once
    examples = read_examples(data, data_format, label_names=label_names)
    task = "classification" if examples.kind == "classification" else "causal_lm"
    model, tokenizer = load_model(model_name, task=task, label_names=examples.label_names, quantize=quantize)
    if adapter is not None:
        load_adapter(model, adapter)
    tokens = tokenize_examples(examples, tokenizer, max_length)
    results = {"model": model_name, "adapter": str(adapter) if adapter else None, "data": str(data),
               "examples": len(examples.items)}

    def score(scored) -> dict:
        return _scores(scored, tokenizer, examples, tokens, task, batch_size, max_new_tokens)

    if alphas is None:
        results.update(score(model))
        if texts is not None:
            results["forgetting"] = evaluate.forgetting(model, tokenizer, texts, batch_size=batch_size)
        return results
    from feathertune.interpolation import interpolate

    base = None
    if texts is not None:  # every α is compared with the α = 0 model, the base: scored once
        base = evaluate.general_score(interpolate(model, 0.0), tokenizer, texts, batch_size=batch_size)
    results["interpolation"] = []
    for alpha in alphas:
        print(f"α = {alpha:g}: interpolating and scoring …", file=sys.stderr)
        mixed = interpolate(model, alpha)
        entry = {"alpha": alpha, **score(mixed)}
        if base is not None:
            entry["forgetting"] = evaluate.forgetting(mixed, tokenizer, texts, base=base, batch_size=batch_size)
        results["interpolation"].append(entry)
    return results


def _scores(model, tokenizer, examples, tokens, task: str, batch_size: int, max_new_tokens: int) -> dict:
    if examples.kind == "preference":  # which answer of each pair the model ranks higher, and the base; DPO's loss
        batches = _batches(tokens, tokenizer.pad_token_id, batch_size, next(model.parameters()).device)
        scores = dpo.validation_scores(model, batches, LoopConfig.dpo_beta)
        return {"loss": scores.pop("eval_loss"), **scores}
    results = {"loss": mean_loss(model, tokens, tokenizer.pad_token_id, task, batch_size)}
    if task == "classification":
        results["accuracy"] = evaluate.accuracy(model, _batches(tokens, tokenizer.pad_token_id, batch_size))
    elif examples.kind == "chat":
        answers = evaluate.generate(model, tokenizer, examples.conversations(), batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
        results.update(answer_scores(answers, examples.references()))
    return results


def _write_eval(out: Path, results: dict) -> None:
    write_atomic(out / "eval.json", json.dumps(results, indent=2) + "\n")
