"""Evaluation: BLEU, greedy generation, token-weighted LM loss, classifier accuracy, sample files, and
forgetting (how much worse than its base a tuned model does on general text).

Everything here leaves the model and tokenizer as it found them (training mode, padding side, pad
token), so a training loop can call it between steps without side effects. Losses are computed from
logits here rather than read from `model(...).loss`, because HF averages per batch and a mean of
batch means over-weights short batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import string
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from feathertune.adapters import STATE, disabled
from feathertune.data import collate
from feathertune.errors import ConfigError, DataError
from feathertune.file_layout import peft_task_type
from feathertune.files import write_atomic
from feathertune.loss import IGNORE_INDEX, loss_sum
from feathertune.wrapping import adapter_sites


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (0–100) with sacrebleu's defaults (13a tokenisation, exp smoothing).

    Args:
        hypotheses: one system output per item.
        references: for each item, its reference translations; items may have different numbers.

    BLEU counts word n-grams up to 4, so answers of a word or two score 0 even when right: read it
    beside `chrf` and `exact_match`.

    Raises:
        ConfigError: the lists differ in length, or an item has no reference.
    """
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(hypotheses, references, "bleu")).score)


def chrf(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus chrF (0–100; Popović 2015): F-score of character 6-grams, β = 2, sacrebleu's defaults.

    Character n-grams give partial credit to short answers and to near misses in inflection,
    where BLEU's word 4-grams give none. Arguments and errors as for `bleu`.
    """
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(hypotheses, references, "chrf")).score)


def exact_match(hypotheses: list[str], references: list[list[str]]) -> float:
    """Share (0–1) of answers equal to one of their references, compared after `normalize_answer`.

    Arguments and errors as for `bleu`.
    """
    _reference_streams(hypotheses, references, "exact_match")  # the same checks as the other scores
    hits = sum(normalize_answer(h) in {normalize_answer(r) for r in refs} for h, refs in zip(hypotheses, references))
    return hits / len(hypotheses)


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, punctuation at either end stripped: "  Blue. " -> "blue"."""
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")


def _reference_streams(hypotheses: list[str], references: list[list[str]], source: str) -> list[list[str | None]]:
    """Check the arguments of a corpus score and turn per-item references into sacrebleu's streams.

    sacrebleu takes references as *streams* (stream k holds every item's k-th reference), so items
    with fewer references are padded with None, which sacrebleu drops per segment (see
    `BLEU._cache_references`). Padding with '' instead would count an empty reference and change the
    closest-reference length used by the brevity penalty.
    """
    problems = []
    if len(hypotheses) != len(references):
        problems.append(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists; "
                        "pass one list of references per hypothesis")
    if not hypotheses:
        problems.append(f"no hypotheses: {source} of an empty corpus is undefined")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            problems.append(f"references[{i}] is a string; wrap it in a list: [{refs[:30]!r}]")
        elif not refs:
            problems.append(f"references[{i}] is empty; each item needs at least one reference")
    if problems:
        raise ConfigError(problems, source=source)
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """model.eval() and no_grad for the block, then every submodule's own training flag back.

    Restoring per module (not `model.train(was_training)`) keeps a deliberately frozen part of a
    training model (e.g. a base in eval mode to turn its dropout off) as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokenizer's eos plus any the model's generation config lists (chat models often end a
    turn with a token, e.g. <|im_end|>, that differs from the tokenizer's eos)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([config_eos] if isinstance(config_eos, int) else (config_eos or []))
    return sorted(ids)


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 16, progress: bool = True, desc: str = "generating") -> list[str]:
    """Greedy answers to chat conversations, in input order.

    Each conversation is rendered with the tokenizer's chat template (add_generation_prompt=True)
    and decoded greedily until eos or `max_new_tokens`. Prompts are batched longest first, so that
    similar lengths share a batch (less padding) and an out-of-memory shows on the first batch.
    Padding is on the left, as decoder-only models need; the tokenizer's padding side (and pad
    token, borrowed from eos if it has none) is restored afterwards, even on error.

    Returns:
        The new text of each conversation, special tokens skipped, whitespace stripped.

    Raises:
        ConfigError: bad batch_size / max_new_tokens, or a tokenizer without chat template or eos.
    """
    from tqdm.auto import tqdm

    problems = []
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r}; use a positive integer, e.g. 16")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens!r}; use a positive integer, e.g. 64")
    if getattr(tokenizer, "chat_template", None) is None:
        problems.append("the tokenizer has no chat_template; use an instruct/chat model's tokenizer "
                        "or set tokenizer.chat_template")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos token, so generation could not tell where an "
                        "answer ends; set tokenizer.eos_token")
    if problems:
        raise ConfigError(problems, source="generate")
    if not conversations:
        return []

    prompts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
               for c in conversations]
    # The chat template already holds any BOS, so don't let the tokenizer add a second one.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    answers: list[str | None] = [None] * len(prompts)
    eos = eos_ids(model, tokenizer)
    device = _device_of(model)

    saved = tokenizer.padding_side, tokenizer.pad_token
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, file=sys.stderr, unit="ex")
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with _evaluating(model):
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = tokenizer([prompts[i] for i in batch], add_special_tokens=False,
                                   padding=True, return_tensors="pt").to(device)
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=1, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens); pads after eos
                for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    answers[i] = text.strip()
                bar.update(len(batch))
    finally:
        bar.close()
        tokenizer.padding_side, tokenizer.pad_token = saved
    return answers  # type: ignore[return-value]  # every slot was filled


def _logits_of(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The model's logits for a batch, without passing labels (so HF computes no loss of its own)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def language_model_loss(model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean cross-entropy per supervised token over all batches, and its perplexity.

    Token i's logits predict token i+1 (the causal shift); labels equal to -100 are not counted.
    The mean is over tokens, not batches: a batch with twice the supervised tokens weighs twice.

    Returns:
        {"loss": mean nats per supervised token, "perplexity": exp(loss), "tokens": count}.

    Raises:
        DataError: no batch had a supervised token (e.g. every answer was truncated away).
        ConfigError: a batch has no labels, or labels whose shape differs from the logits'.
    """
    total, tokens = 0.0, 0
    device = _device_of(model)
    with _evaluating(model):
        for n, batch in enumerate(batches):
            if "labels" not in batch:
                raise ConfigError(f"batch {n} has keys {sorted(batch)} but no 'labels'",
                                  source="language_model_loss")
            inputs = {k: v.to(device) for k, v in batch.items()}
            labels = inputs["labels"]  # (B, T)
            if labels.shape != inputs["input_ids"].shape:
                raise ConfigError(f"batch {n}: labels have shape {tuple(labels.shape)} but the input_ids "
                                  f"{tuple(inputs['input_ids'].shape)}; labels must be (batch, sequence)",
                                  source="language_model_loss")
            if "attention_mask" not in inputs:
                inputs["attention_mask"] = torch.ones_like(labels)
            total += loss_sum(model, inputs).item()  # the training step's own loss
            tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    if tokens == 0:
        raise DataError(["no supervised tokens: every label (after the causal shift) is -100; check "
                         "that answers survive truncation and that the loader gave any batches"])
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def accuracy(model, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Share of examples whose argmax logit is the label, over all batches (example-weighted).

    Batches hold the model's inputs (input_ids, attention_mask, ...) and `labels`, one class id
    per example.

    Raises:
        DataError: the batches held no example.
    """
    correct, seen = 0, 0
    device = _device_of(model)
    with _evaluating(model):
        for n, batch in enumerate(batches):
            if "labels" not in batch:
                raise ConfigError(f"batch {n} has keys {sorted(batch)} but no 'labels'", source="accuracy")
            predicted = _logits_of(model, batch, device).argmax(dim=-1)  # (B,)
            labels = batch["labels"].to(device)
            correct += int((predicted == labels).sum())
            seen += labels.numel()
    if seen == 0:
        raise DataError(["accuracy() got no examples; the evaluation loader is empty"])
    return correct / seen


# --- files ------------------------------------------------------------------------------------

SAMPLE_FIELDS = ("prompt", "reference", "base", "tuned")
_SAMPLE_HEADINGS = {"base": "Base model", "tuned": "Fine-tuned", "reference": "Reference"}


def _as_text(value) -> str:
    """A sample field as text: strings as they are, a chat conversation as 'role: content' lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return str(value)


def _fenced(text: str) -> str:
    """A code block that shows `text` verbatim: the fence is longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def write_samples(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write samples.md: for each row, the prompt, then the base model's, the fine-tuned model's
    and the reference answer, as a readable markdown section. Written atomically.

    Args:
        rows: dicts with keys "prompt", "reference", "base" and "tuned" (strings; a prompt may also
            be a list of chat messages).

    Raises:
        ConfigError: rows missing fields (all of them are listed).
    """
    problems = [f"rows[{i}] lacks {', '.join(repr(k) for k in SAMPLE_FIELDS if k not in row)}"
                for i, row in enumerate(rows) if not all(k in row for k in SAMPLE_FIELDS)]
    if problems:
        raise ConfigError(problems + [f"each row needs keys {list(SAMPLE_FIELDS)}"], source="write_samples")
    parts = ["# Samples: base vs fine-tuned\n",
             f"{len(rows)} examples. Each shows the prompt, then the base model's answer, the "
             "fine-tuned model's answer, and the reference answer.\n"]
    for n, row in enumerate(rows, start=1):
        parts.append(f"## Example {n}\n\n**Prompt**\n\n{_fenced(_as_text(row['prompt']))}\n")
        for key in ("base", "tuned", "reference"):
            parts.append(f"**{_SAMPLE_HEADINGS[key]}**\n\n{_fenced(_as_text(row[key]))}\n")
    write_atomic(path, "\n".join(parts))


# --- forgetting: what tuning cost on general text ------------------------------------------------

GENERAL_TEXT = Path(__file__).resolve().parents[2] / "data" / "general" / "wikitext.txt"


def general_text(path: str | os.PathLike | None = None) -> list[str]:
    """The general-text sample, one paragraph a line: by default data/general/wikitext.txt, 78
    paragraphs of Wikipedia prose from WikiText-2 (CC BY-SA 3.0; see data/README.md).

    Raises:
        DataError: the file is missing or holds no text.
    """
    where = Path(path) if path is not None else GENERAL_TEXT
    if not where.is_file():
        raise DataError([f"no such file; the general-text sample is a text file of paragraphs, one a line "
                         f"(the shipped one is {GENERAL_TEXT}, rebuilt by scripts/make_general_text.py)"],
                        path=str(where))
    texts = [line.strip() for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DataError(["the file holds no text; write one paragraph a line"], path=str(where))
    return texts


@dataclasses.dataclass(frozen=True)
class GeneralScore:
    """One model on the general text, what `forgetting` compares: a causal LM's mean next-token loss,
    or an encoder's mean-pooled final hidden states."""

    measure: str  # "loss" (causal LM) or "drift" (encoder)
    tokens: int  # loss: the tokens predicted; drift: the tokens pooled
    loss: float | None = None  # nats per token ("loss")
    states: torch.Tensor | None = None  # (texts, d) float64, one mean-pooled state per text ("drift")


def general_text_loss(model: nn.Module, tokenizer, texts: list[str] | None = None, *, batch_size: int = 8,
                      max_length: int = 256) -> tuple[float, int]:
    """A causal LM's token-weighted mean next-token loss on plain text, and the tokens it predicted.

    Each text is tokenized as the tokenizer does by default (with its BOS, if it adds one; no chat
    template), cut to `max_length` tokens, and every token after the first is predicted: the loss of
    `language_model_loss`, the training step's own. Works on any causal LM that takes input_ids and
    returns logits, a PEFT PeftModel included (measure its base inside `disable_adapter()`).

    Args:
        texts: paragraphs; None: the shipped sample, `general_text()`.

    Raises:
        ConfigError: the model is not a causal LM, or texts is empty or holds a blank string.
    """
    if peft_task_type(model, []) != "CAUSAL_LM":
        raise ConfigError(f"{type(model).__name__} is not a causal LM, so it has no loss on plain text; "
                          f"use mean_pooled_states (or forgetting(), which does) for an encoder",
                          source="general_text_loss")
    batches = _text_batches(tokenizer, _checked_texts(texts), batch_size, max_length)
    scored = language_model_loss(model, batches)
    return scored["loss"], scored["tokens"]


def mean_pooled_states(model: nn.Module, tokenizer, texts: list[str] | None = None, *, batch_size: int = 8,
                       max_length: int = 256) -> tuple[torch.Tensor, int]:
    """Per text, the mean over its tokens of the backbone's final hidden state, and the tokens pooled.

    The whole model runs (so adapters that rewrite its inputs, prompt tuning's virtual tokens, take
    part) and the output of its backbone (`model.base_model`, e.g. BertModel: the last layer,
    after any ReFT edit) is read by a hook. Virtual tokens that a method puts in front of the text
    (prompt tuning) are left out of the mean: only the text's own T positions, the last T, count.
    A classifier's head is not part of it.

    Returns:
        (texts, d) float64 states, in the order of `texts`; the number of tokens pooled.

    Raises:
        ConfigError: the model has no backbone that returns hidden states; texts empty or blank.
    """
    backbone = _backbone(model)
    rows = _text_batches(tokenizer, _checked_texts(texts), batch_size, max_length, order=True)
    captured: list[torch.Tensor] = []
    hook = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    states, tokens, device = {}, 0, _device_of(model)
    try:
        with _evaluating(model):
            for indices, batch in rows:
                captured.clear()
                model(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
                mask = batch["attention_mask"].to(device)  # (B, T)
                hidden = captured[-1]  # (B, n+T, d): n virtual tokens first, if any
                assert hidden.shape[1] >= mask.shape[1], (tuple(hidden.shape), tuple(mask.shape))
                hidden = hidden[:, -mask.shape[1]:].double()  # (B, T, d)
                weights = mask.unsqueeze(-1).double()  # (B, T, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, d)
                states.update(zip(indices, pooled.cpu()))
                tokens += int(mask.sum())
    finally:
        hook.remove()
    return torch.stack([states[i] for i in range(len(states))]), tokens


def representation_drift(states: torch.Tensor, base_states: torch.Tensor) -> float:
    """Mean over texts of 1 − cos(s, s₀), between (texts, d) pooled states of a model and of its base.

    0 when the representations are unchanged; 1 when they are orthogonal on average (at most 2).
    Scale-free, so a uniform change of norm (e.g. a scaled layer norm) counts for nothing.
    """
    assert states.shape == base_states.shape, (tuple(states.shape), tuple(base_states.shape))
    cosine = torch.nn.functional.cosine_similarity(states.double(), base_states.double(), dim=-1)  # (texts,)
    return float((1 - cosine).mean())


def general_score(model: nn.Module, tokenizer, texts: list[str] | None = None, *, batch_size: int = 8,
                  max_length: int = 256) -> GeneralScore:
    """The model's GeneralScore: its loss if it is a causal LM, else its pooled states."""
    options = {"batch_size": batch_size, "max_length": max_length}
    if peft_task_type(model, []) == "CAUSAL_LM":
        loss, tokens = general_text_loss(model, tokenizer, texts, **options)
        return GeneralScore("loss", tokens, loss=loss)
    states, tokens = mean_pooled_states(model, tokenizer, texts, **options)
    return GeneralScore("drift", tokens, states=states)


def forgetting(model: nn.Module, tokenizer, texts: list[str] | None = None, *,
               base: nn.Module | GeneralScore | None = None, batch_size: int = 8, max_length: int = 256) -> dict:
    """How much worse the model does than its base on general text it was not tuned for.

    Causal LMs ("measure": "loss"): L, the token-weighted mean next-token loss on `texts`
    (`general_text_loss`), with the adapters as they are, and L₀ the same for the base:

        forgetting = L − L₀ (nats per token),   forgetting_pct = 100·(L/L₀ − 1)

    Encoders with no LM head ("measure": "drift"; e.g. a BERT classifier) have no loss on text; the
    measure is how far the representations moved: forgetting = mean over texts of 1 − cos(s, s₀) of
    the mean-pooled final hidden states (`mean_pooled_states`), forgetting_pct = 100·forgetting.

    The base is the model under `disabled()` (every adapter off, merged ones undone meanwhile), or
    `base`. What each method changes on plain text: layer methods (LoRA, DoRA, (IA)³, bottleneck,
    partial, full, BitFit) every position; prompt and prefix tuning and LLaMA-Adapter add their
    learned tokens in front of each text; ReFT, given no prompt lengths, treats each whole text as
    the prompt and edits its first and last K tokens (its `positions`), so the loss measures how
    those edits shift the prediction of the whole paragraph.

    Args:
        texts: paragraphs; None: the shipped sample, `general_text()` (78 paragraphs of Wikipedia).
        base: the model to compare with, required for a model with no feathertune adapters (a full
            fine-tune saved as a model), or its GeneralScore computed once (`general_score`) to
            compare several models against one base.
        batch_size, max_length: texts per forward; tokens kept per text. The figures depend on
            max_length, so compare runs measured with the same one.

    Returns:
        {"general_loss": L, "base_general_loss": L₀ (None for drift), "forgetting", "forgetting_pct",
         "general_tokens": tokens scored, "general_texts": texts scored, "measure": "loss" | "drift"}.
        The model is left as found (training flags, adapters, merged state).

    Raises:
        ConfigError: no adapters and no `base`; a base of the other kind (loss vs drift).
    """
    texts = _checked_texts(texts)
    options = {"batch_size": batch_size, "max_length": max_length}
    if base is None and STATE not in model.__dict__:
        raise ConfigError(f"this {type(model).__name__} has no feathertune adapters, so there is no base inside it "
                          f"to compare with; pass base=<the original model> (e.g. for a full fine-tune saved as "
                          f"a model)", source="forgetting")
    score = general_score(model, tokenizer, texts, **options)
    if isinstance(base, GeneralScore):
        base_score = base
    elif base is not None:
        base_score = general_score(base, tokenizer, texts, **options)
    else:
        with _as_base(model):
            base_score = general_score(model, tokenizer, texts, **options)
    return forgetting_figures(score, base_score, len(texts))


def forgetting_figures(score: GeneralScore, base: GeneralScore, texts: int) -> dict:
    """The dict `forgetting` returns, from the tuned model's and the base's scores on the same texts."""
    if score.measure != base.measure:
        raise ConfigError(f"the model's general-text measure is {score.measure!r} and the base's {base.measure!r}; "
                          f"compare a causal LM with a causal LM and an encoder with an encoder", source="forgetting")
    if score.measure == "loss":
        return {"general_loss": score.loss, "base_general_loss": base.loss, "forgetting": score.loss - base.loss,
                "forgetting_pct": 100 * (score.loss / base.loss - 1), "general_tokens": score.tokens,
                "general_texts": texts, "measure": "loss"}
    drift = representation_drift(score.states, base.states)
    return {"general_loss": None, "base_general_loss": None, "forgetting": drift, "forgetting_pct": 100 * drift,
            "general_tokens": score.tokens, "general_texts": texts, "measure": "drift"}


def _checked_texts(texts: list[str] | None) -> list[str]:
    if texts is None:
        return general_text()
    problems = [f"texts[{i}] is {'blank' if isinstance(t, str) else type(t).__name__}: {t!r:.40}"
                for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if isinstance(texts, str) or not texts:
        problems = [f"texts={texts!r:.40}: give a non-empty list of paragraphs (or None for the shipped sample)"]
    if problems:
        raise ConfigError(problems, source="forgetting")
    return list(texts)


def _text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, *, order: bool = False) -> list:
    """Right-padded batches of the texts, longest first (an out-of-memory shows on the first batch),
    with labels equal to the input ids: every token after the first is predicted.

    Args:
        order: give (the texts' indices, batch) pairs, to put per-text results back in order.
    """
    problems = []
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r}; use a positive integer, e.g. 8")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        problems.append(f"max_length={max_length!r}; use an integer ≥ 2, e.g. 256")
    if problems:
        raise ConfigError(problems, source="forgetting")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    rows = [{"input_ids": row, "labels": row} for row in ids]
    longest_first = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, so any id does
    batches = []
    for start in range(0, len(rows), batch_size):
        indices = longest_first[start:start + batch_size]
        batch = collate([rows[i] for i in indices], pad_id)
        batches.append((indices, batch) if order else batch)
    return batches


@contextlib.contextmanager
def _as_base(model: nn.Module) -> Iterator[None]:
    """`disabled(model)`, unless every adapter is off already (inside the caller's own `disabled`
    block): its exit turns every site back on, so a nested one would end the caller's block early."""
    if all(site.disabled for _, site in adapter_sites(model)):
        yield
    else:
        with disabled(model):
            yield


def _backbone(model: nn.Module) -> nn.Module:
    """The module whose output's first element is the final hidden states (B, T, d): a transformers
    model's `base_model` (under a PEFT PeftModel too)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"{type(model).__name__} is neither a causal LM nor a transformers model with a "
                          f"backbone (model.base_model), so it has no general-text measure",
                          source="forgetting")
    return backbone
