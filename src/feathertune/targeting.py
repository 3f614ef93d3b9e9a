"""Which modules a config hits: names, regexes, "all-linear", block indices.

The rules are PEFT's, so that a config means the same module set in both libraries:
- a list entry matches a module whose full name equals it or ends with "." + it;
- a string is a regular expression that must match the full name;
- "all-linear" is every linear layer (nn.Linear, HF Conv1D, quantized linears) except the output head;
- `layers` keeps only modules inside those block indices (the first ".<name>.<digits>." in the name).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from feathertune.errors import TargetError
from feathertune.wrapping import inside_wrapper, unwrap

ALL_LINEAR = "all-linear"

_LAYER_INDEX = re.compile(r"(?:.*?\.)?[^.]+\.(\d+)\.")


def hf_conv1d_class() -> type | None:
    """transformers' Conv1D (GPT-2's transposed linear), or None when transformers is absent."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # feathertune works on plain PyTorch models too
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """True for layers that compute x·Wᵀ + b: nn.Linear, HF Conv1D and 4-bit linears."""
    conv1d = hf_conv1d_class()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return True
    # bitsandbytes' Linear4bit subclasses nn.Linear; this also catches wrappers that expose one.
    return False


def layer_index(name: str) -> int | None:
    """Block index of a module: the first numbered segment after a name, e.g. 'model.layers.3.mlp' -> 3."""
    match = _LAYER_INDEX.match(name + ".")
    return int(match.group(1)) if match else None


def name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's matching rule for one module name (see the module docstring)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a rank/alpha pattern dict that matches `name`'s tail, as PEFT reads them."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return pattern
    return None


def block_names(model: nn.Module) -> list[str]:
    """Full names of the model's repeated blocks (decoder or encoder layers), bottom to top.

    The nn.ModuleList of one module type that holds the most parameters, e.g. Llama's
    `model.layers.0`…`model.layers.N`, GPT-2's `transformer.h.*`, BERT's `bert.encoder.layer.*`.
    Empty if the model has none (a CNN, a plain MLP).
    """
    skip = inside_wrapper(model)
    best, best_size = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or name in skip:
            continue
        if len({type(unwrap(child)) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = [f"{name}.{i}" if name else str(i) for i in range(len(module))], size
    return best


def output_head_name(model: nn.Module) -> str | None:
    """Full name of the output head (tied to the vocabulary), which "all-linear" leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Module) else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    layers: Sequence[int] | None,
    exclude: Sequence[str],
    supported: Callable[[nn.Module], bool],
    supported_names: str,
) -> list[str]:
    """Full names of the modules a config hits, in model order.

    Args:
        target_modules: a list, a regex or "all-linear" (see the module docstring).
        layers: keep only modules in these block indices; None keeps all.
        exclude: names (PEFT list rule) never targeted, e.g. modules_to_save.
        supported: whether a module's type can be wrapped.
        supported_names: those types in words, for the error message.

    Raises:
        TargetError: nothing matched, or a match has a type that cannot be wrapped.
    """
    head = output_head_name(model)
    all_linear = target_modules == ALL_LINEAR
    hits, unsupported = [], []
    wrapped_parts = inside_wrapper(model)
    for name, module in model.named_modules():
        if not name or name in wrapped_parts or name_matches(name, exclude) or _inside(name, exclude):
            continue
        if all_linear:
            matched = is_linear(unwrap(module)) and name != head
        else:
            matched = name_matches(name, target_modules)
        if not matched:
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        if supported(module):
            hits.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TargetError(
            f"target_modules={target_modules!r} matched modules that cannot carry this adapter: "
            f"{', '.join(unsupported[:8])}{' …' if len(unsupported) > 8 else ''}; "
            f"supported layer types are {supported_names}. Name the layers inside them instead."
        )
    if not hits:
        raise TargetError(_nothing_matched(model, target_modules, layers, supported))
    return hits


def _inside(name: str, prefixes: Sequence[str]) -> bool:
    """True if `name` lies inside a module named by the PEFT list rule (e.g. a classifier's parts)."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), prefixes) for i in range(1, len(parts)))


def _nothing_matched(model, target_modules, layers, supported) -> str:
    skip = inside_wrapper(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and n not in skip and supported(m)})
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    guesses = sorted({g for w in wanted for g in difflib.get_close_matches(w, leaves, n=1)})
    message = f"target_modules={target_modules!r} matched no module"
    if layers is not None:
        found = sorted({i for n, _ in model.named_modules() if (i := layer_index(n)) is not None})
        message += f" in layers={list(layers)} (block indices in this model: {_ranges(found)})"
    message += f"; modules that exist include {', '.join(leaves[:12])}{' …' if len(leaves) > 12 else ''}"
    if guesses:
        message += f" (did you mean {', '.join(guesses)}?)"
    return message


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}..{numbers[-1]}"
    return ", ".join(map(str, numbers))
