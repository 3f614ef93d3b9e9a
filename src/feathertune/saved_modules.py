"""`modules_to_save`: modules trained in full next to an adapter, e.g. a new classifier head.

Each adapter gets its own trainable copy; the original stays frozen and untouched, so disabling
or switching adapters is exact. In files the copy is saved under the module's own name, as PEFT does.
"""

from __future__ import annotations

import copy
import difflib

import torch
from torch import nn

from feathertune.errors import TargetError
from feathertune.file_layout import PREFIX
from feathertune.targeting import name_matches
from feathertune.wrapping import WrappedLayer, inside_wrapper, site_at


class ModulesToSave(WrappedLayer):
    """A frozen original module and one trainable copy of it per adapter."""

    needs_attention_mask = False  # the wrapped module gets its arguments, mask included, as they come

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.copies = nn.ModuleDict()
        self._merged_into_base = False
        # Per adapter, where its keys start in files. PEFT's prompt-learning models hold the user's model
        # directly (no tuner in between), so their files say base_model.<path>, not PREFIX<path>.
        self.key_prefixes: dict[str, str] = {}

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.base)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.copies[name].parameters()) if name in self.copies else []

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.key_prefixes.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        prefix = self.key_prefixes.get(name, PREFIX)
        return {f"{prefix}{path}.{key}": tensor for key, tensor in self.copies[name].state_dict().items()}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        prefix = self.key_prefixes.get(name, PREFIX)
        for key, target in self.copies[name].state_dict().items():
            target.copy_(tensors[f"{prefix}{path}.{key}"])

    def chosen(self) -> nn.Module:
        """The module the forward uses: the first active adapter's copy, else the original."""
        if self.disabled:
            return self.base
        for name in self.active:
            if name in self.copies:
                return self.copies[name]
        return self.base

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.context.adapter_names is None or self.disabled:
            return self.chosen()(x, *args, **kwargs)
        out = self.base(x, *args, **kwargs)
        for name, rows in self.rows_by_adapter(x.shape[0]).items():
            if name in self.copies:
                out = out.index_copy(0, rows, self.copies[name](x[rows], *args, **kwargs))
        return out

    def unwrapped(self) -> nn.Module:
        return self.chosen()


def attach_saved_modules(model: nn.Module, names: list[str], adapter: str, strict: bool = True) -> list[str]:
    """Wrap the modules named by `names` (PEFT's list rule) and give `adapter` a copy of each.

    Args:
        strict: raise if an entry matches nothing (False when loading: PEFT adds 'classifier'
            and 'score' to every sequence-classification config, whichever the model has).

    Returns:
        The full names of the wrapped modules.

    Raises:
        TargetError: an entry matched no module.
    """
    if not names:
        return []
    skip = inside_wrapper(model)
    hits = [n for n, _ in model.named_modules() if n and n not in skip and name_matches(n, names)]
    # Only the outermost match: a classifier and its inner Linear would otherwise both be copied.
    hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
    missing = [m for m in names if not any(name_matches(h, [m]) for h in hits)]
    if missing and strict:
        children = sorted({n for n, _ in model.named_children()})
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n and n not in skip})
        guesses = sorted({g for m in missing for g in difflib.get_close_matches(m, leaves, n=1)})
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise TargetError(f"modules_to_save={missing!r} matched no module{hint}; top-level modules are "
                          f"{', '.join(children)}", source="modules_to_save")
    for name in hits:
        module = site_at(model, name, ModulesToSave)
        module.add_adapter(adapter)
    return hits
