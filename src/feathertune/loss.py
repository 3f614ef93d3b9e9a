"""The one loss: token-weighted cross-entropy, used by the training step, the validation loss, the
final report and `evaluate.language_model_loss` alike.

    causal LM:       Σ over supervised tokens t of −log p(x_t | x_<t)     (prompt tokens, padding: -100)
    classification:  Σ over examples of −log p(label | text)

A step's loss is this sum over the global batch divided by its count of targets, wherever the
rows were computed: so micro-batches, processes and validation batches all weigh a token the same.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from feathertune.adapters import STATE
from feathertune.data import Tokenized, collate
from feathertune.data.batching import IGNORE_INDEX  # labels with this value carry no loss
from feathertune.wrapping import adapter_sites, model_sites


def loss_sum(model: nn.Module, inputs: dict[str, torch.Tensor], task: str = "causal_lm", *,
             sparse_head: bool = True, mask_free_attention: bool = True) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets: supervised tokens (causal LM) or examples.

    Only positions that predict a supervised token need the vocabulary-sized output head. With
    `sparse_head` (the default) the model computes it at exactly those positions — a (targets, vocab)
    block instead of (B, T, vocab): with prompts masked that is a quarter of the positions on chat
    data, and neither the full logits nor their log-softmax are ever held. Off: logits at every
    position, the textbook path that A/B checks compare against. Same sum either way.

    With `mask_free_attention`, a right-padded batch goes in without its attention mask where no
    adapter reads it: under causal attention every pad comes after every real token of its row, so
    no real token can see one, and the pads' own outputs carry no loss. Without a mask SDPA runs its
    causal kernel (half the score blocks) on grouped keys and values as they are, not repeated.
    """
    if task == "classification":
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return F.cross_entropy(logits.float(), inputs["labels"], reduction="sum")
    logits, targets, _ = supervised_logits(model, inputs, sparse_head=sparse_head,
                                           mask_free_attention=mask_free_attention)
    return F.cross_entropy(_at_least_fp32(logits), targets, reduction="sum")


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in fp32 for the softmax; fp64 (reference checks) stays fp64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def sequence_logps(model: nn.Module, inputs: dict[str, torch.Tensor], *, sparse_head: bool = True,
                   mask_free_attention: bool = True) -> torch.Tensor:
    """(B,) per row, Σ over its supervised tokens of log p(x_t | x_<t): a response's log-probability,
    the quantity preference objectives (DPO) compare. Same forward as `loss_sum`."""
    logits, targets, rows = supervised_logits(model, inputs, sparse_head=sparse_head,
                                              mask_free_attention=mask_free_attention)
    token_logps = -F.cross_entropy(_at_least_fp32(logits), targets, reduction="none")  # (targets,)
    return token_logps.new_zeros(inputs["labels"].shape[0]).index_add(0, rows, token_logps)


def supervised_logits(model: nn.Module, inputs: dict[str, torch.Tensor], *, sparse_head: bool = True,
                      mask_free_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal LM's logits at the positions that predict a supervised token: (targets, vocab),
    with those tokens (targets,) and the row each comes from (targets,), in row-major order."""
    labels = inputs["labels"]  # (B, T)
    inner = getattr(model, "module", model)  # DDP wraps the model
    kwargs = {}
    if STATE in inner.__dict__:  # feathertune's pre-hook takes it; a plain model would not
        kwargs["prompt_lengths"] = prompt_lengths(labels, inputs["attention_mask"])
    mask = inputs["attention_mask"]
    if mask_free_attention and _mask_is_redundant(inner, mask):
        mask = None
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): the position predicts a supervised token
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    if sparse_head and _accepts_logits_to_keep(inner):
        if _takes_head_mask(inner):
            logits = model(input_ids=inputs["input_ids"], attention_mask=mask, logits_to_keep=keep,
                           **kwargs).logits  # (targets, vocab)
            return logits, labels[:, 1:][keep[:, :-1]], rows
        # Else the trailing positions from the first supervised token on, which any version takes.
        kwargs["logits_to_keep"] = trailing_positions_needed(labels)
    logits = model(input_ids=inputs["input_ids"], attention_mask=mask, **kwargs).logits
    logits = logits[:, -labels.shape[1]:]  # virtual tokens (prompt tuning), where a model returns them, come first
    kept = logits.shape[1]  # logits[:, j] is position T-kept+j and predicts the token after it
    return logits[keep[:, labels.shape[1] - kept:]], labels[:, 1:][keep[:, :-1]], rows


def _takes_head_mask(model: nn.Module) -> bool:
    """Whether `logits_to_keep` may be a (B, T) mask: transformers 5 models that slice through
    `slice_logits_to_keep` (4.x takes a trailing count only), and no prompt tuning, whose virtual
    tokens lengthen the sequence past the mask."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "slice_logits_to_keep", None) is not None and not any(model_sites(model))


def _mask_is_redundant(model: nn.Module, mask: torch.Tensor) -> bool:
    """Right padding only (every row 1…1 0…0), a causal decoder, and no adapter site that reads the mask."""
    causal = type(model).__name__.endswith("ForCausalLM") and not getattr(model.config, "is_encoder_decoder", False)
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    return causal and right_padded and not any(site.needs_attention_mask for _, site in adapter_sites(model))


def target_count(row: dict, task: str = "causal_lm") -> int:
    """How many targets a tokenized row adds to a loss sum (its denominator's share): a preference
    pair and a classified example count one, a causal LM row its supervised tokens."""
    if task == "classification" or "rejected_input_ids" in row:
        return 1
    return sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX)  # the first token is never predicted


@torch.no_grad()
def mean_loss(model: nn.Module, data: Tokenized, pad_id: int, task: str, batch_size: int, loss_fn=None) -> float:
    """Mean loss per target over a tokenized data set, in eval mode (restored after): cross-entropy, or
    `loss_fn(model, inputs)` → the batch's summed loss (DPO's). Rows go shortest first in batches of
    `batch_size` (less padding)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(data.rows)), key=lambda i: data.lengths[i])
    starts = range(0, len(order), batch_size)
    try:
        for start in tqdm(starts, desc="validation loss", unit="batch", leave=False, file=sys.stderr,
                          disable=len(starts) < 8):
            indices = order[start:start + batch_size]
            inputs = {k: v.to(device) for k, v in collate([data.rows[i] for i in indices], pad_id).items()}
            total += (loss_fn(model, inputs) if loss_fn else loss_sum(model, inputs, task)).item()
            count += sum(target_count(data.rows[i], task) for i in indices)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) per row, its real tokens before the first supervised one: the prompt, where ReFT edits.
    A row supervised from its first token (text data) has no prompt of its own: all of it counts."""
    real = attention_mask.bool()
    before = (real & ((labels != IGNORE_INDEX) & real).cumsum(-1).eq(0)).sum(-1)
    return torch.where(before > 0, before, real.sum(-1))


def trailing_positions_needed(labels: torch.Tensor) -> int:
    """How many trailing positions hold every logit that predicts a supervised token."""
    supervised = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(supervised) == 0:
        return labels.shape[1]
    first = int(supervised[0])  # the logit at first-1 predicts the first supervised token
    return labels.shape[1] - max(first - 1, 0)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
