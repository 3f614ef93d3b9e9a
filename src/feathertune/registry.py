"""Method name -> how to attach it, whether it merges, and its `peft_type` in adapter files.

One checked table, so that the model-level operations (attach, save, load, merge) never need to
know which method they are handling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from feathertune.config import MethodConfig
from feathertune.methods.lora import LoraConfig, attach_lora


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[MethodConfig]
    attach: Callable[..., list[str]]  # (model, config, adapter name) -> adapted module names
    peft_type: str  # the value in adapter_config.json
    mergeable: bool


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", LoraConfig, attach_lora, peft_type="LORA", mergeable=True),
}


def spec_for(config: MethodConfig) -> MethodSpec:
    for spec in METHODS.values():
        if type(config) is spec.config_class:
            return spec
    raise TypeError(f"{type(config).__name__} is not a method config; known: "
                    f"{', '.join(s.config_class.__name__ for s in METHODS.values())}")


def spec_for_peft_type(peft_type: str) -> MethodSpec | None:
    return next((s for s in METHODS.values() if s.peft_type == peft_type), None)
