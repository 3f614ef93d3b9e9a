"""WiSE-FT: interpolate the weights of a base model and its fine-tune.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (CVPR), eq. 1, the weight-space
ensemble:

    θ_α = (1 − α)·θ_base + α·θ_tuned,   α ∈ [0, 1]

in every tensor. α = 0 is the base, α = 1 the fine-tune; in between, the paper finds the fine-tune's
gains on its own task mostly kept and the base's robustness elsewhere mostly restored, at no cost
at inference (one model). Values outside [0, 1] extrapolate ("task arithmetic").

For a mergeable adapter (LoRA, (IA)³, partial and full fine-tuning) θ_base is the model without
it and θ_tuned the model with it merged; a plain fine-tuned model is interpolated against the
`base` it came from.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from feathertune.adapters import STATE, adapter_state, delete_adapter, merge, unmerge
from feathertune.errors import ConfigError
from feathertune.registry import spec_for


def interpolate(model: nn.Module, alpha: float, base: nn.Module | None = None) -> nn.Module:
    """A new plain model with θ = (1 − α)·θ_base + α·θ_tuned in every floating-point tensor.

    Args:
        model: a model with mergeable adapters active (θ_tuned is their merge), or a plain
            fine-tuned model (then `base` is required).
        alpha: 0 gives the base exactly, 1 the fine-tune exactly.
        base: the original model; None: `model` without its adapters.

    Returns:
        A new model (the inputs are left as they were), with no feathertune adapters.

    Raises:
        ConfigError: alpha is not a finite number; an active adapter cannot merge; no base to
            interpolate against; the two models' tensors differ in names or shapes; a quantized tensor.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"alpha={alpha!r} must be a finite number (0: the base, 1: the fine-tune)",
                          source="interpolate")
    adapted = STATE in model.__dict__
    if not adapted and base is None:
        raise ConfigError("this model has no feathertune adapters, so it has no base inside it; pass "
                          "base=<the original model> to interpolate a full fine-tune", source="interpolate")
    tuned = _merged_copy(model) if adapted else copy.deepcopy(model)
    base_tensors = (base if base is not None else _base_copy(model)).state_dict()
    tuned_tensors = tuned.state_dict(keep_vars=True)
    _check_same_tensors(base_tensors, tuned_tensors)
    with torch.no_grad():
        done = set()
        for name, tensor in tuned_tensors.items():
            if id(tensor) in done or not tensor.is_floating_point():
                continue
            done.add(id(tensor))  # tied tensors appear under several names
            start = base_tensors[name].to(tensor.device, tensor.dtype)
            tensor.copy_((1 - alpha) * start + alpha * tensor)
    return tuned


def _merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with its active adapters merged in."""
    state = adapter_state(model)
    refused = [f"{n} ({type(state.configs[n]).__name__})" for n in state.active
               if not spec_for(state.configs[n]).mergeable]
    if refused:
        raise ConfigError(f"WiSE-FT interpolates weights, and the active adapter {', '.join(refused)} does not "
                          f"live in the weights (it cannot be merged); interpolate a LoRA, (IA)³, partial or "
                          f"full fine-tune", source="interpolate")
    copied = copy.deepcopy(model)  # its own adapter state, sites and forward hooks
    unmerge(copied)
    return merge(copied, unload=True)


def _base_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with every adapter taken off."""
    copied = copy.deepcopy(model)
    unmerge(copied)
    for name in list(adapter_state(copied).configs):
        delete_adapter(copied, name)
    return copied


def _check_same_tensors(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    problems = [f"{n}: only in the fine-tuned model" for n in tuned if n not in base]
    problems += [f"{n}: only in the base" for n in base if n not in tuned]
    problems += [f"{n}: base {tuple(base[n].shape)}, fine-tuned {tuple(t.shape)}" for n, t in tuned.items()
                 if n in base and base[n].shape != t.shape]
    problems += [f"{n}: quantized ({t.dtype}); interpolate full-precision models" for n, t in tuned.items()
                 if t.dtype in (torch.uint8, torch.int8) and n in base]
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:12]) + ("\n  …" if len(problems) > 12 else "")
        raise ConfigError(f"the base and the fine-tuned model do not have the same tensors, so they cannot be "
                          f"interpolated:\n{shown}", source="interpolate")
