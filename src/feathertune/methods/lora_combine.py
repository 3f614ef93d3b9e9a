"""Combining LoRA adapters into one: `ft.combine(model, {"a": 0.7, "b": 0.3}, "ab", how=...)`.

Adapter i adds ΔWᵢ = sᵢ·Bᵢ·Aᵢ to a layer (sᵢ = αᵢ/rᵢ, or αᵢ/√rᵢ for rsLoRA). The target on every
layer any of them adapts is the weighted sum

    ΔW = Σᵢ cᵢ·Bᵢ·Aᵢ,   cᵢ = wᵢ·sᵢ   (an adapter absent from a layer contributes 0 there)

stored as a new plain LoRA adapter with scale 1 (alpha = r on every layer). Three ways, per layer:

    cat     A = [A₁; A₂; …] (rows),  B = [c₁·B₁, c₂·B₂, …] (columns)             rank Σᵢ rᵢ
            B·A = Σᵢ cᵢ·Bᵢ·Aᵢ exactly: the output is y_base + Σᵢ wᵢ·(yᵢ − y_base) at every layer.
    linear  A = Σᵢ cᵢ·Aᵢ / √|S|,  B = sign(S)·Σᵢ cᵢ·Bᵢ / √|S|,  S = Σᵢ cᵢ           rank r (all rᵢ equal)
            B·A = (1/S)·Σᵢⱼ cᵢ·cⱼ·Bᵢ·Aⱼ: exact when the adapters share A, or share B (or there is
            one); otherwise the cross terms Bᵢ·Aⱼ (i ≠ j) make it an approximation. Adding the factors
            as A = Σ αᵢ·Aᵢ, B = Σ βᵢ·Bᵢ is exact for a shared A iff βᵢ·Σα = cᵢ and for a shared B iff
            αᵢ·Σβ = cᵢ; both force α, β ∝ c, and √|S| splits the 1/S evenly. S ≈ 0 is refused.
    svd     B = U_k·√Σ_k,  A = √Σ_k·V_kᵀ  from the SVD of the dense ΔW            rank k
            ‖ΔW − B·A‖_F = √(Σ_{j>k} σⱼ²), the best rank-k approximation (Eckart–Young); exact when
            k ≥ rank(ΔW). k defaults to the largest rᵢ on the layer and is clamped to
            min(k, Σᵢ rᵢ, out, in), as ΔW has no more singular values than that.

Linear layers, HF Conv1D (A and B are kept in the (out, in) view, whatever the storage),
nn.Conv2d (kernels flattened to (out, in·kh·kw)) and nn.Embedding all work. The new adapter is
frozen, attached through the normal path and saved as a normal PEFT LoRA file (rank_pattern and
alpha_pattern where ranks differ). DoRA adapters are refused (their row norm is not linear in B·A),
and so are adapters that also train biases or modules_to_save. The math is in `functional`.

PEFT's `add_weighted_adapter` differs in two places. Its "linear" takes A = Σᵢ sign(cᵢ)·√|cᵢ|·Aᵢ,
B = Σᵢ √|cᵢ|·Bᵢ, exact for a single adapter but not for adapters that share A or B. Its "svd" puts
all of Σ_k on B; we split √Σ_k to both sides (the product, and so the error, is the same).
"""

from __future__ import annotations

import math
from collections import Counter
from numbers import Real

import torch
from torch import nn

from feathertune import functional as fn
from feathertune.adapters import _attach, adapter_state, set_trainable
from feathertune.errors import ConfigError
from feathertune.file_layout import FilePlan
from feathertune.methods.lora import LoraConfig, LoraLayer
from feathertune.methods.lora_peft import pattern_key_for
from feathertune.wrapping import adapter_sites

HOWS = ("cat", "linear", "svd")


def combine(model: nn.Module, weights: dict[str, float], name: str, how: str = "cat",
            rank: int | None = None) -> nn.Module:
    """Add LoRA adapter `name`, the weighted combination of existing LoRA adapters, and activate it.

    Args:
        weights: {adapter name: weight wᵢ}; weights may be negative (subtracting an adapter).
        name: the new adapter's name; it is frozen (for inference) and becomes the active one.
        how: "cat" (exact, rank Σ rᵢ), "linear" (rank r, needs equal ranks per layer, approximate)
            or "svd" (rank `rank`, the best rank-k approximation); see the module docstring.
        rank: svd only: the rank k (default: the largest rᵢ on each layer). Per layer it is clamped
            to min(k, Σᵢ rᵢ, out, in), since ΔW has no more singular values than that; below the
            rank of ΔW the result is truncated with error √(Σ_{j>k} σⱼ²).

    Returns:
        The same model, changed in place.

    Raises:
        ConfigError: unknown, non-LoRA, DoRA or biased adapters; a merged model; an existing
            `name`; bad weights, `how` or `rank`; unequal ranks (linear) or Σᵢ cᵢ = 0 (linear).
    """
    _check_arguments(weights, how, rank)
    _check_adapters(model, weights, name)
    layers = {path: site for path, site in adapter_sites(model)
              if isinstance(site, LoraLayer) and any(n in site.lora for n in weights)}
    if how == "linear":
        _check_linear(layers, weights)
    factors = {path: _layer_factors(layer, weights, how, rank) for path, layer in layers.items()}
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    _attach(model, _combined_config(ranks), name, init=False, plan=FilePlan(targets=list(layers), sizes=ranks))
    set_trainable(model, name, False)
    with torch.no_grad():
        for path, (A, B) in factors.items():
            adapter = layers[path].lora[name]
            adapter.A.copy_(A.to(adapter.A.dtype))
            adapter.B.copy_(B.to(adapter.B.dtype))
    return model


def _check_arguments(weights, how, rank) -> None:
    problems = []
    if not isinstance(weights, dict) or not weights:
        problems.append(f"weights={weights!r} must be a non-empty mapping of adapter name -> weight, "
                        f"e.g. {{'a': 0.7, 'b': 0.3}}")
    else:
        problems += [f"weights[{k!r}]={w!r} must be a finite number" for k, w in weights.items()
                     if not isinstance(w, Real) or isinstance(w, bool) or not math.isfinite(w)]
    if how not in HOWS:
        problems.append(f"how={how!r} is not one of {', '.join(map(repr, HOWS))} (cat: exact, rank Σ r; "
                        f"linear: rank r, approximate; svd: best rank-k approximation)")
    if rank is not None and how != "svd":
        problems.append(f"rank={rank!r} applies only to how='svd' (how={how!r} decides the rank itself)")
    elif rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        problems.append(f"rank={rank!r} must be a positive integer (or None: the largest r of the adapters)")
    if problems:
        raise ConfigError(problems, source="combine")


def _check_adapters(model: nn.Module, weights: dict[str, float], name: str) -> None:
    """Every named adapter exists and is a plain (linear) LoRA, the model is unmerged, `name` is free."""
    configs = adapter_state(model).configs
    loras = [n for n, c in configs.items() if isinstance(c, LoraConfig)]
    problems = []
    if name in configs:
        problems.append(f"an adapter named {name!r} is already attached; pick another name or "
                        f"ft.delete_adapter it first")
    for n in weights:
        config = configs.get(n)
        if config is None:
            problems.append(f"no adapter named {n!r}; LoRA adapters attached: {', '.join(loras) or 'none'}")
        elif not isinstance(config, LoraConfig):
            problems.append(f"adapter {n!r} is not LoRA ({type(config).__name__}); combine takes LoRA adapters only "
                            f"(attached: {', '.join(loras) or 'none'})")
        elif config.use_dora:
            problems.append(f"adapter {n!r} uses DoRA (use_dora=True): its row-norm rescaling makes the update "
                            f"non-linear in B·A, so a weighted sum of it is no LoRA adapter; combine plain "
                            f"LoRA or rsLoRA adapters")
        elif config.bias != "none" or config.modules_to_save:
            problems.append(f"adapter {n!r} also trains bias={config.bias!r} / modules_to_save="
                            f"{config.modules_to_save}; combine merges only the LoRA factors, so it takes "
                            f"adapters with bias='none' and no modules_to_save")
    if any(site.is_merged() for _, site in adapter_sites(model)):
        problems.append("the model has merged adapters; call ft.unmerge(model) before combining")
    if problems:
        raise ConfigError(problems, source="combine")


def _check_linear(layers: dict[str, LoraLayer], weights: dict[str, float]) -> None:
    """how='linear' adds the factors themselves, so on each layer they need one shape and Σ cᵢ ≠ 0."""
    problems = []
    for path, layer in layers.items():
        ranks = {n: layer.lora[n].factors()[0].shape[0] for n in weights if n in layer.lora}
        if len(set(ranks.values())) > 1:
            problems.append(f"{path}: ranks {ranks} differ; how='linear' adds A and B factor by factor, "
                            f"so use how='cat' (exact, rank Σ r) or how='svd' (rank of your choice)")
            continue
        coefs = [w * layer.lora[n].scale for n, w in weights.items() if n in layer.lora]
        if abs(sum(coefs)) <= 1e-6 * sum(map(abs, coefs)):  # 1/√|S| would blow up
            problems.append(f"{path}: Σ weight·scale = {sum(coefs):.3g} ≈ 0, which how='linear' cannot "
                            f"factor (it divides by √|Σ|); use how='cat' or how='svd'")
    if problems:
        more = [f"… and {len(problems) - 10} more layers"] if len(problems) > 10 else []
        raise ConfigError(problems[:10] + more, source="combine")


def _layer_factors(layer: LoraLayer, weights: dict[str, float], how: str,
                   rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined update on this layer, at scale 1, in at least float32."""
    As, Bs, coefs = [], [], []
    for n, w in weights.items():
        if n in layer.lora:
            A, B = layer.lora[n].factors()  # PiSSA's frozen start is part of its update
            work = torch.promote_types(A.dtype, torch.float32)
            As.append(A.detach().to(work))
            Bs.append(B.detach().to(work))
            coefs.append(w * layer.lora[n].scale)
    if how == "cat":
        return fn.lora_cat(As, Bs, coefs)
    if how == "linear":
        return fn.lora_linear_combination(As, Bs, coefs)
    delta = fn.lora_weighted_delta(As, Bs, coefs)
    ranks = [A.shape[0] for A in As]
    k = min(rank or max(ranks), sum(ranks), *delta.flatten(1).shape)
    return fn.truncated_svd_factors(delta, k)


def _combined_config(ranks: dict[str, int]) -> LoraConfig:
    """A LoRA config with scale 1 (alpha = r) on each layer, r per layer as given."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {pattern_key_for(path): k for path, k in ranks.items() if k != r}
    return LoraConfig(r=r, alpha=r, dropout=0.0, target_modules=list(ranks), rank_pattern=others,
                      alpha_pattern=dict(others))
