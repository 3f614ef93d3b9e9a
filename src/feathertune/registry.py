"""Method name -> everything method-specific that the model-level code needs.

One checked table, so that attach, save, load, merge and the training config never need to know
which method they are handling: a new method is one file in `methods/` plus one row here.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from feathertune.config import MethodConfig
from feathertune.errors import ConfigError
from feathertune.file_layout import FilePlan
from feathertune.methods import bottleneck, ia3, llama_adapter, lora_peft, partial, prefix_tuning, prompt_tuning, reft
from feathertune.methods.lora import LoraConfig, attach_lora


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[MethodConfig]
    # (model, config, adapter name, *, init=True, plan=None) -> names of the adapted sites
    attach: Callable[..., list[str]]
    peft_type: str  # the value in adapter_config.json
    mergeable: bool
    # (model, config, adapter name, site paths, saved module paths) -> adapter_config.json values
    config_to_file: Callable[[nn.Module, Any, str, list[str], list[str]], dict[str, Any]]
    # (adapter_config.json values, where) -> config; refuses what feathertune does not implement
    config_from_file: Callable[[dict[str, Any], str], MethodConfig]
    # (model, file tensors, config, where) -> how to re-attach so that the tensors fit
    plan_from_file: Callable[[nn.Module, dict[str, torch.Tensor], Any, str], FilePlan]
    mixed_batch: bool = True  # per-row adapters (`adapter_names=[...]`) work; False: refused by name


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", LoraConfig, attach_lora, peft_type=lora_peft.PEFT_TYPE, mergeable=True,
                       config_to_file=lora_peft.config_to_file, config_from_file=lora_peft.config_from_file,
                       plan_from_file=lora_peft.plan_from_file),
    "ia3": MethodSpec("ia3", ia3.IA3Config, ia3.attach_ia3, peft_type=ia3.PEFT_TYPE, mergeable=True,
                      config_to_file=ia3.config_to_file, config_from_file=ia3.config_from_file,
                      plan_from_file=ia3.plan_from_file),
    "bottleneck": MethodSpec("bottleneck", bottleneck.BottleneckConfig, bottleneck.attach_bottleneck,
                             peft_type=bottleneck.PEFT_TYPE, mergeable=False,
                             config_to_file=bottleneck.config_to_file,
                             config_from_file=bottleneck.config_from_file,
                             plan_from_file=bottleneck.plan_from_file),
    "llama_adapter": MethodSpec("llama_adapter", llama_adapter.LlamaAdapterConfig,
                                llama_adapter.attach_llama_adapter, peft_type=llama_adapter.PEFT_TYPE,
                                mergeable=False, config_to_file=llama_adapter.config_to_file,
                                config_from_file=llama_adapter.config_from_file,
                                plan_from_file=llama_adapter.plan_from_file, mixed_batch=True),
    "prompt_tuning": MethodSpec("prompt_tuning", prompt_tuning.PromptTuningConfig, prompt_tuning.attach_prompt_tuning,
                                peft_type=prompt_tuning.PEFT_TYPE, mergeable=False,
                                config_to_file=prompt_tuning.config_to_file,
                                config_from_file=prompt_tuning.config_from_file,
                                plan_from_file=prompt_tuning.plan_from_file, mixed_batch=False),
    "prefix_tuning": MethodSpec("prefix_tuning", prefix_tuning.PrefixTuningConfig, prefix_tuning.attach_prefix_tuning,
                                peft_type=prefix_tuning.PEFT_TYPE, mergeable=False,
                                config_to_file=prefix_tuning.config_to_file,
                                config_from_file=prefix_tuning.config_from_file,
                                plan_from_file=prefix_tuning.plan_from_file, mixed_batch=False),
    "partial": MethodSpec("partial", partial.PartialConfig, partial.attach_partial, peft_type=partial.PEFT_TYPE,
                          mergeable=True, config_to_file=partial.config_to_file,
                          config_from_file=partial.config_from_file, plan_from_file=partial.plan_from_file),
    "reft": MethodSpec("reft", reft.ReftConfig, reft.attach_reft, peft_type=reft.PEFT_TYPE, mergeable=False,
                       config_to_file=reft.config_to_file, config_from_file=reft.config_from_file,
                       plan_from_file=reft.plan_from_file, mixed_batch=True),
}


# Names the training config also accepts: a registry method with some of its settings fixed.
# qlora is LoRA over a base quantized to NF4 (the training config's `quantize: nf4`); bitfit trains the
# biases only (Ben Zaken et al. 2022) and full every tensor, both as partial fine-tuning.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dora": ("lora", {"use_dora": True}), "rslora": ("lora", {"use_rslora": True}),
    "pissa": ("lora", {"init": "pissa"}), "qlora": ("lora", {}),
    "bitfit": ("partial", {"bias_only": True}), "full": ("partial", {"modules": partial.ALL}),
}


def method_names() -> list[str]:
    """Every name `method:` accepts: the registry's, then the variants."""
    return [*METHODS, *VARIANTS]


def resolve_method(name: str, source: str = "method") -> tuple[MethodSpec, dict[str, Any]]:
    """(the registry row, the settings the name fixes) for a `method:` name.

    Raises:
        ConfigError: an unknown name; the message lists the available ones.
    """
    if isinstance(name, str) and name in VARIANTS:  # a list or a mapping (from YAML, a job's JSON) is unhashable
        base, preset = VARIANTS[name]
        return METHODS[base], dict(preset)
    if isinstance(name, str) and name in METHODS:
        return METHODS[name], {}
    names = method_names()
    hint = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
    raise ConfigError(f"method={name!r} is not a method feathertune has{did_you_mean}; available: "
                      f"{', '.join(names)}", source=source)


def spec_for(config: MethodConfig) -> MethodSpec:
    for spec in METHODS.values():
        if type(config) is spec.config_class:
            return spec
    raise TypeError(f"{type(config).__name__} is not a method config; known: "
                    f"{', '.join(s.config_class.__name__ for s in METHODS.values())}")


def spec_for_peft_type(peft_type: str) -> MethodSpec | None:
    return next((s for s in METHODS.values() if s.peft_type == peft_type), None)
