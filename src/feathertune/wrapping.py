"""Wrap, don't subclass: the small protocol every adapter-carrying layer follows.

A wrapper holds the original layer as `self.base` and calls it, so the same adapter sits on
nn.Linear, a 4-bit linear or HF's Conv1D. Model-level operations (activate, disable, merge, save)
talk to wrappers only through the methods below, whatever the method inside.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

BASE = "__base__"  # in a mixed batch: this row uses no adapter


class WrappedLayer(nn.Module):
    """A layer that carries named adapters around a frozen `base` layer."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.active: list[str] = []  # adapters whose outputs add up in the forward
        self.disabled = False  # True inside `ft.disabled(model)`: behave exactly as the base
        self.batch_adapter_names: list[str] | None = None  # mixed batch: one adapter name per row

    def adapter_names(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must list its adapters")

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement delete_adapter")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that belong to adapter `name` on this layer (what training updates)."""
        raise NotImplementedError(f"{type(self).__name__} must list adapter parameters")

    def merge(self) -> None:
        """Fold the active adapters into the base weights (idempotent)."""

    def unmerge(self) -> None:
        """Undo `merge`, restoring the original weights (idempotent)."""

    def is_merged(self) -> bool:
        return False

    def unwrapped(self) -> nn.Module:
        """The plain layer to put back in the model after `merge` (adapters already folded in)."""
        return self.base

    def rows_by_adapter(self, batch: int) -> dict[str, torch.Tensor]:
        """In a mixed batch: row indices per adapter name, the base rows left out."""
        names = self.batch_adapter_names
        assert names is not None and len(names) == batch, (names, batch)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name != BASE:
                groups.setdefault(name, []).append(row)
        device = next(self.base.parameters(), torch.empty(0)).device
        return {n: torch.tensor(rows, device=device) for n, rows in groups.items()}


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, WrappedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, WrappedLayer):
            yield name, module


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


def inside_wrapper(model: nn.Module) -> set[str]:
    """Names of modules that live inside a wrapper (the wrapped originals and their children)."""
    names = set()
    for prefix, _ in wrapped_layers(model):
        names.update(f"{prefix}.{n}" if n else prefix for n, _ in model.get_submodule(prefix).named_modules())
        names.discard(prefix)
    return names
