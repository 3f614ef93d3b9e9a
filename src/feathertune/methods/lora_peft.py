"""LoRA in Hugging Face PEFT's file format: adapter_config.json keys and tensor names.

The layout is PEFT's byte for byte, so that vLLM and PEFT load what we save and we load what they
save. Anything in a PEFT config that would change the maths and that feathertune does not
implement is refused by name: loading it anyway would give silently wrong outputs.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from feathertune import file_layout
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.methods.lora import EMBEDDING_SUFFIXES, TENSOR_SUFFIXES, LoraConfig, LoraLayer

PEFT_TYPE = "LORA"

LEGACY_MAGNITUDE = "lora_magnitude_vector.weight"  # older PEFT files name the magnitude so
EMBEDDING_COPY = "base_layer.weight"  # PEFT saves a targeted embedding's base weight beside its LoRA
# Every tensor suffix a PEFT LoRA file may hold after "<module path>.", longest first so that
# "lora_magnitude_vector.weight" is not read as "…weight".
FILE_SUFFIXES = tuple(sorted({*TENSOR_SUFFIXES.values(), *EMBEDDING_SUFFIXES.values(), LEGACY_MAGNITUDE,
                              EMBEDDING_COPY}, key=len, reverse=True))

# PEFT LoraConfig keys feathertune reads, or that only describe the file (no effect on the maths).
USED_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern",
             "alpha_pattern", "modules_to_save", "init_lora_weights", "use_rslora", "use_dora", "bias",
             "layers_to_transform", "layers_pattern", "fan_in_fan_out",
             "megatron_core", "qalora_group_size", "exclude_modules", "eva_config", "corda_config"}
# Keys that change the maths unless they hold this value; feathertune does not implement them.
MUST_BE_DEFAULT = {"layer_replication": None, "lora_bias": False, "use_qalora": False,
                   "alora_invocation_tokens": None, "arrow_config": None, "trainable_token_indices": None,
                   "target_parameters": None, "megatron_config": None, "loftq_config": {},
                   "use_bdlora": None, "kasa_config": None, "velora_config": None,
                   "monteclora_config": None, "lora_ga_config": None, "ensure_weight_tying": False}
# init_lora_weights values that leave the base weights as they were (others rewrite the base).
BASE_PRESERVING_INITS = {True, False, "gaussian", "eva", "orthogonal"}


def check_peft_config(values: dict[str, Any], where: str) -> None:
    """Refuse a PEFT LoRA config that uses anything feathertune does not implement, naming each."""
    found = []
    init = values.get("init_lora_weights", True)
    if init not in BASE_PRESERVING_INITS:
        found.append(f"init_lora_weights={init!r}: this init rewrites the base weights, so the adapter "
                     f"only works on that rewritten base; re-save it from PEFT with "
                     f"path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    if values.get("bias", "none") not in ("none", "lora_only"):
        found.append(f"bias={values.get('bias')!r} (feathertune supports 'none' and 'lora_only')")
    file_layout.refuse_unknown(values, USED_KEYS, MUST_BE_DEFAULT, where, "LoRA", extra=found)


def config_from_file(values: dict[str, Any], where: str) -> LoraConfig:
    """The LoraConfig a PEFT adapter_config.json describes, after refusing what we lack."""
    check_peft_config(values, where)
    return config_from_peft(values)


def config_from_peft(values: dict[str, Any]) -> LoraConfig:
    """The LoraConfig that a (checked) PEFT LoRA config describes."""
    layers = values.get("layers_to_transform")
    init = values.get("init_lora_weights", True)
    return LoraConfig.from_dict({
        "r": values.get("r", 8),
        "alpha": values.get("lora_alpha", 8),
        "dropout": values.get("lora_dropout", 0.0),
        "target_modules": values.get("target_modules") or "all-linear",
        "layers": [layers] if isinstance(layers, int) else layers,
        "rank_pattern": values.get("rank_pattern") or {},
        "alpha_pattern": values.get("alpha_pattern") or {},
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
        "init": "gaussian" if init == "gaussian" else "default",
        "use_rslora": values.get("use_rslora", False),  # not bool(): "false" must be an error
        "use_dora": values.get("use_dora", False),
        "bias": values.get("bias", "none"),
    }, source="adapter_config.json")


def file_rank_and_alpha(layer: LoraLayer, name: str, config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(r, alpha) to write for this module, such that PEFT computes the same scale from them."""
    adapter = layer.lora[name]
    r, alpha = config.rank_and_alpha(module_name)
    file_r = adapter.factors()[0].shape[0]
    if file_r == r:
        return r, alpha
    # PiSSA doubles the rank on export; keep s = alpha/r (or alpha/√r) unchanged.
    return file_r, alpha * (file_r / r if not config.use_rslora else math.sqrt(file_r / r))


def config_to_file(model: nn.Module, config: LoraConfig, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """PEFT's adapter_config.json for adapter `name`, with the targets resolved to this model."""
    layers = {m: model.get_submodule(m) for m in adapted if isinstance(model.get_submodule(m), LoraLayer)}
    pairs = {m: file_rank_and_alpha(layer, name, config, m) for m, layer in layers.items()}
    r = Counter(p[0] for p in pairs.values()).most_common(1)[0][0] if pairs else config.r
    alpha = Counter(p[1] for p in pairs.values()).most_common(1)[0][0] if pairs else config.alpha
    # Explicit per-module entries, so the file does not depend on how patterns are interpreted.
    rank_pattern = {pattern_key_for(m): p[0] for m, p in pairs.items() if p[0] != r}
    alpha_pattern = {pattern_key_for(m): p[1] for m, p in pairs.items() if p[1] != alpha}
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": file_layout.resolved_targets(model, list(layers), saved),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": [m for m in config.modules_to_save] or None,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "lora_bias": False,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    }


def pattern_key_for(module_name: str) -> str:
    """A rank/alpha pattern key that matches this one module under PEFT's rule '(.*\\.)?(key)$'."""
    return "^" + module_name.replace(".", r"\.")


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: LoraConfig, where: str) -> FilePlan:
    """Which modules the file adapts, with what rank (`plan.sizes`); every key must find its place."""
    by_path, plan = file_layout.group_by_module(model, tensors, FILE_SUFFIXES, config.modules_to_save, where)
    unplaced = []
    for path in list(plan.targets):
        parts = by_path[path]
        if LEGACY_MAGNITUDE in parts:
            plan.renamed[f"{PREFIX}{path}.{LEGACY_MAGNITUDE}"] = f"{PREFIX}{path}.{TENSOR_SUFFIXES['magnitude']}"
        if EMBEDDING_COPY in parts:
            # PEFT saves a targeted embedding's base weight; we keep ours, after checking its shape.
            key = f"{PREFIX}{path}.{EMBEDDING_COPY}"
            plan.ignored.append(key)
            ours = getattr(model.get_submodule(path), "base", model.get_submodule(path)).weight
            if tuple(parts[EMBEDDING_COPY].shape) != tuple(ours.shape):
                unplaced.append(f"{key}: file has shape {tuple(parts[EMBEDDING_COPY].shape)}, this model's is "
                                f"{tuple(ours.shape)}")
        A = parts.get(TENSOR_SUFFIXES["A"], parts.get(EMBEDDING_SUFFIXES["A"]))
        if A is not None:
            plan.sizes[path] = A.shape[0]
        elif set(parts) == {EMBEDDING_COPY}:
            plan.targets.remove(path)
        else:
            unplaced.append(f"{PREFIX}{path}.* (no lora_A tensor for this module)")
    if unplaced:
        raise file_layout.mismatch(f"{where}: tensors that do not fit this model:", unplaced)
    return plan
