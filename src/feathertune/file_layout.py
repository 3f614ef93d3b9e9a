"""The adapter directory's layout, shared by every method's file mapping.

    adapter_config.json         the method's config under PEFT's keys, with its `peft_type`
    adapter_model.safetensors   tensors named base_model.model.<module path>.<suffix> (layer sites)
                                or by the method's own names (PEFT's `prompt_embeddings`)

Each method maps its config and tensors to these files (in `methods/`); `checkpoint.py` writes and
reads them. What they share — the key prefix, the plan a file gives for re-attaching, the checks
that refuse what a method does not implement — lives here, so no method writes it again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from feathertune.errors import AdapterMismatchError, UnsupportedAdapterError
from feathertune.targeting import name_matches

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModel -> its tuner -> the user's model

# PEFT config keys that only describe the file or the run, never the maths.
DESCRIPTIVE_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                    "auto_mapping", "peft_version"}


@dataclasses.dataclass
class FilePlan:
    """How to re-attach an adapter so that a file's tensors fit: read from the file by the method."""

    targets: list[str] = dataclasses.field(default_factory=list)  # module paths to adapt, model order
    sizes: dict[str, Any] = dataclasses.field(default_factory=dict)  # per target: what the shapes say (LoRA: r)
    saved: list[str] = dataclasses.field(default_factory=list)  # modules_to_save found in the file
    ignored: list[str] = dataclasses.field(default_factory=list)  # keys that need no loading (checked by the method)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # older key spellings -> today's


def group_by_module(model: nn.Module, tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...],
                    modules_to_save: list[str], where: str) -> tuple[dict[str, dict[str, torch.Tensor]], FilePlan]:
    """Split `PREFIX<path>.<suffix>` keys into {path: {suffix: tensor}} and the modules_to_save.

    Every key must find its place: a method suffix on a module the model has, or a module_to_save.

    Raises:
        AdapterMismatchError: keys that fit nowhere, each listed.
    """
    modules = dict(model.named_modules())
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    plan, unplaced = FilePlan(), []
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            unplaced.append(f"{key} (does not start with {PREFIX!r})")
            continue
        rest = key[len(PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is not None:
            by_path.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
            continue
        owner = saved_owner(rest, modules, modules_to_save)
        if owner is None:
            unplaced.append(key)
        elif owner not in plan.saved:
            plan.saved.append(owner)
    unplaced += [f"{PREFIX}{path}.* (this model has no module {path!r})" for path in by_path if path not in modules]
    if unplaced:
        raise mismatch(f"{where}: tensors that do not fit this model:", unplaced)
    order = {n: i for i, n in enumerate(modules)}
    plan.saved.sort(key=order.__getitem__)
    plan.targets = sorted(by_path, key=order.__getitem__)
    return by_path, plan


def check_targets(found: list[str], expected: list[str], where: str, header: str, *, unexpected: str,
                  absent: str) -> None:
    """Refuse a file whose adapted modules are not the ones its own config names on this model.

    Raises:
        AdapterMismatchError: listing each module in the file but not named (`unexpected`), and each
            named but not in the file (`absent`).
    """
    if found == expected:
        return
    lines = [f"{PREFIX}{t}.*: {unexpected}" for t in found if t not in expected]
    lines += [f"{PREFIX}{t}.*: {absent}" for t in expected if t not in found]
    raise mismatch(f"{where}: {header}", lines)


def saved_owner(rest: str, modules: dict[str, nn.Module], modules_to_save: list[str]) -> str | None:
    """The modules_to_save module a key like 'classifier.dense.weight' belongs to, if any."""
    parts = rest.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in modules and name_matches(prefix, modules_to_save):
            return prefix
    return None


def refuse_unknown(values: dict[str, Any], used: set[str], must_be: dict[str, Any], where: str,
                   method: str, extra: list[str] = ()) -> None:
    """Refuse a PEFT config that uses what feathertune does not implement, naming each key.

    Loading it anyway would give silently wrong outputs. `used`: keys the method reads; `must_be`:
    keys that change the maths unless they hold this value; `extra`: the method's own findings.
    """
    problems = list(extra)
    for key, value in values.items():
        if key in used or key in DESCRIPTIVE_KEYS:
            continue
        if key in must_be:
            default = must_be[key]
            if value != default and not (_is_empty(value) and _is_empty(default)):
                problems.append(f"{key}={value!r} (feathertune supports only {default!r})")
        elif not _is_empty(value):
            problems.append(f"{key}={value!r} is a key feathertune does not know; it may change the maths")
    if problems:
        raise UnsupportedAdapterError(f"{where}: this {method} adapter uses what feathertune does not support "
                                      f"yet, so it is not loaded:\n" + "\n".join(f"  - {p}" for p in problems))


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def mismatch(header: str, lines: list[str], shown: int = 20) -> AdapterMismatchError:
    listing = "\n".join(f"  - {line}" for line in lines[:shown]) + ("\n  …" if len(lines) > shown else "")
    return AdapterMismatchError(f"{header}\n{listing}\nIs this adapter for another base model?")


def base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def peft_task_type(model: nn.Module, saved: list[str]) -> str | None:
    """PEFT's task_type for a transformers model: what AutoPeftModelFor… reads to rebuild the model.

    SEQ_CLS also tells PEFT that the classification head ('classifier' or 'score') is saved with the
    adapter, so it is written only when the head is among the saved modules; else None.
    """
    kind = type(model).__name__
    if kind.endswith("ForCausalLM") or kind.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if kind.endswith("ForSequenceClassification") and {"classifier", "score"} & set(saved):
        return "SEQ_CLS"
    return None


def common_header(model: nn.Module, peft_type: str, saved: list[str]) -> dict[str, Any]:
    """The keys every adapter_config.json starts with."""
    return {"peft_type": peft_type, "task_type": peft_task_type(model, saved),
            "base_model_name_or_path": base_model_name(model), "revision": None, "inference_mode": True}


def resolved_targets(model: nn.Module, adapted: list[str], saved: list[str]) -> list[str]:
    """The shortest target list that PEFT's matching rule maps to exactly `adapted` on this model.

    Leaf names ("q_proj") when they pick out exactly these modules, else the full names.
    """
    leaves = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    names = [n for n, _ in model.named_modules() if n and not _wrapped_part(n, adapted + saved)]
    if {n for n in names if name_matches(n, leaves) and not name_matches(n, saved)} == set(adapted):
        return leaves
    return list(adapted)


def _wrapped_part(name: str, wrappers: list[str]) -> bool:
    """True for the modules inside a wrapper (e.g. 'q_proj.base'), which PEFT never sees."""
    return any(name.startswith(w + ".") for w in wrappers)
