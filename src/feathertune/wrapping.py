"""Adapter sites: the small protocol every place that carries adapters follows.

Two kinds of site:
- a `WrappedLayer` wraps one layer of the model. It holds the original as `self.base` and calls it
  (wrap, don't subclass), so the same adapter sits on nn.Linear, a 4-bit linear or HF's Conv1D.
  LoRA, (IA)³, bottleneck adapters and LLaMA-Adapter live here.
- a `ModelSite` hangs on the model itself, for methods with no layer to wrap (prompt and prefix
  tuning): it rewrites the model's inputs before the forward and its outputs after.

Model-level operations (activate, disable, delete, merge, save, load) talk to sites only through
the methods below, whatever the method inside. Every site of a model shares one `ForwardContext`,
filled in once per forward by the model's pre-hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

BASE = "__base__"  # in a mixed batch: this row uses no adapter
# The forward's KV-cache argument: transformers 5 calls it `cache`, 4.x (and 5's deprecated alias) `past_key_values`.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@dataclasses.dataclass
class ForwardContext:
    """What one forward of the whole model tells its sites (one object per model, shared)."""

    adapter_names: list[str] | None = None  # mixed batch: one adapter name per row, else None
    attention_mask: torch.Tensor | None = None  # (B, T) as the caller gave it, before any prompt
    decoding: bool = False  # a cached decode step: the KV cache already holds the prompt and prefix
    past_length: int = 0  # tokens already in the KV cache (virtual ones included)
    # `model(..., prompt_lengths=...)`: (B,) per row, how many of its real tokens (attention mask 1)
    # are the prompt, the rest being the answer; None: all real tokens of this forward (ReFT's positions)
    prompt_lengths: torch.Tensor | None = None


class AdapterSite(nn.Module):
    """A module that carries named adapters. Subclasses implement the adapter-facing methods."""

    # Whether the site reads the padding mask or token positions itself (the forward context, or the
    # mask among its layer's arguments). Where no site does, the loss may leave out a right-padded
    # batch's attention mask, which causal attention makes redundant (see loss.loss_sum).
    needs_attention_mask = True

    def __init__(self):
        super().__init__()
        self.active: list[str] = []  # adapters that run in the forward
        self.disabled = False  # True inside `ft.disabled(model)`: behave exactly as the base
        self.context = ForwardContext()  # replaced by the model's shared context on attach

    def adapter_names(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must list its adapters")

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement delete_adapter")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that belong to adapter `name` on this site (what training updates)."""
        raise NotImplementedError(f"{type(self).__name__} must list adapter parameters")

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under their names in the adapter file; `path` is this site's
        module path in the model. What save_adapter writes and what loading expects."""
        raise NotImplementedError(f"{type(self).__name__} must name its tensors in files")

    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the file's tensors (keyed as `file_tensors` keys them, shapes already checked) in."""
        raise NotImplementedError(f"{type(self).__name__} must load its tensors from files")

    def merge(self) -> None:
        """Fold the active adapters into the base weights (idempotent)."""

    def unmerge(self) -> None:
        """Undo `merge`, restoring the original weights (idempotent)."""

    def is_merged(self) -> bool:
        return False

    def rows_by_adapter(self, batch: int) -> dict[str, torch.Tensor]:
        """In a mixed batch: row indices per adapter name, the base rows left out."""
        names = self.context.adapter_names
        assert names is not None and len(names) == batch, (names, batch)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name != BASE:
                groups.setdefault(name, []).append(row)
        device = next(self.parameters(), torch.empty(0)).device
        return {n: torch.tensor(rows, device=device) for n, rows in groups.items()}


class WrappedLayer(AdapterSite):
    """A site that carries named adapters around a frozen `base` layer."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def unwrapped(self) -> nn.Module:
        """The plain layer to put back in the model after `merge` (adapters already folded in)."""
        return self.base

    def merges_into(self) -> set[str]:
        """Names of the base layer's tensors that `merge` writes in place (a shared one is untied first)."""
        return {"weight"} if any(n in self.active for n in self.adapter_names()) else set()


class ModelSite(AdapterSite):
    """A site on the model itself (prompt and prefix tuning), registered as the child `attribute`.

    `prepare_inputs` runs before the model's forward and may rewrite its keyword arguments (input
    embeddings, attention mask, labels, KV cache); `finish_outputs` runs after it.
    """

    attribute = "feathertune_site"  # the child name on the model; one per method

    def prepare_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    def finish_outputs(self, output: Any) -> Any:
        return output


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was given, under either of its names; None if none."""
    return next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)


def adapter_sites(model: nn.Module) -> Iterator[tuple[str, AdapterSite]]:
    """Every site in the model, layer wrappers and model-level sites alike, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterSite):
            yield name, module


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, WrappedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, WrappedLayer):
            yield name, module


def model_sites(model: nn.Module) -> Iterator[ModelSite]:
    for module in model.children():
        if isinstance(module, ModelSite):
            yield module


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer inside any number of wrappers."""
    while isinstance(module, WrappedLayer):
        module = module.base
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def site_at(model: nn.Module, path: str, kind: type[WrappedLayer], make=None) -> WrappedLayer:
    """The `kind` site at `path`: the module there if it already is one, else a new `kind` (built by
    `make(module)` if given) wrapping it, put in its place in the module's train/eval mode."""
    module = model.get_submodule(path)
    if isinstance(module, kind):
        return module
    site = (make or kind)(module)
    site.train(module.training)
    replace_module(model, path, site)
    return site


def inside_wrapper(model: nn.Module) -> set[str]:
    """Names of modules that live inside a site (wrapped originals, their children, site parts)."""
    names = set()
    for prefix, _ in adapter_sites(model):
        names.update(f"{prefix}.{n}" if n else prefix for n, _ in model.get_submodule(prefix).named_modules())
        if not isinstance(model.get_submodule(prefix), ModelSite):
            names.discard(prefix)
    return names
