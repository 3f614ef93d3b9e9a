"""What prompt tuning and prefix tuning share: a site on the model that adds n virtual tokens.

Both methods put n learned tokens ahead of every sequence, so the model-level bookkeeping that
depends on the sequence length changes the same way for both, here:

    attention mask   n ones in front (the virtual tokens are always attended)
    position_ids     shifted by n (prompt tuning also gives its tokens 0…n-1)
    cache_position   where the inputs land in the KV cache, virtual tokens counted

With `generate()` the virtual tokens enter once, at prefill (empty cache): prompt tuning as input
embeddings, prefix tuning as keys and values in the cache. Cached decode steps (the cache already
holds them) only extend the mask and shift the positions. The methods themselves are in
`prompt_tuning.py` and `prefix_tuning.py`; this file also maps both to PEFT's files, which share a
layout: one tensor `prompt_embeddings`, and modules_to_save under `base_model.<path>`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.errors import ConfigError
from feathertune.file_layout import FilePlan
from feathertune.saved_modules import ModulesToSave
from feathertune.wrapping import ModelSite, model_sites, wrapped_layers

EMBEDDINGS_KEY = "prompt_embeddings"  # PEFT's one tensor for every prompt-learning method
# PEFT's prompt-learning PeftModel holds the user's model directly, so a saved module's keys are
# base_model.<path> (file_layout.PREFIX adds the tuner, base_model.model.<path>, for layer methods).
PROMPT_PREFIX = "base_model."
# PEFT config keys both methods share, besides file_layout.DESCRIPTIVE_KEYS.
SHARED_KEYS = {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
               "num_transformer_submodules", "modules_to_save"}


class VirtualTokenSite(ModelSite):
    """A model site holding named adapters that each add n virtual tokens; one runs at a time.

    Subclasses hold `self.adapters` (a ModuleDict of modules with `num_virtual_tokens`) and rewrite
    the inputs in `prepare_inputs`.
    """

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters()) if name in self.adapters else []

    def running(self, model: nn.Module) -> str | None:
        """The adapter of this site that this forward runs, or None (disabled, inactive, mixed batch).

        Raises:
            ConfigError: several prompt-learning adapters are active (on this site or another).
        """
        if self.disabled or self.context.adapter_names is not None:
            # A mixed batch that named one of ours was refused already: its rows use other adapters.
            return None
        active = [n for site in model_sites(model) if isinstance(site, VirtualTokenSite)
                  for n in site.active if n in site.adapters]
        if len(active) > 1:
            raise ConfigError(f"adapters {', '.join(map(repr, active))} are active together, but prompt and "
                              f"prefix adapters each change the sequence, so only one of them can run at a "
                              f"time; choose one with ft.set_active(model, {active[0]!r})", source="set_active")
        return next((n for n in self.active if n in self.adapters), None)


def shift_for_virtual_tokens(kwargs: dict[str, Any], n: int, *, in_inputs: bool,
                             cache_start: int) -> dict[str, Any]:
    """Mask, positions and cache positions of a forward whose sequence has n virtual tokens in front.

    Args:
        in_inputs: the virtual tokens are part of this forward's inputs (prompt tuning's prefill),
            rather than already in the KV cache (decode steps, and prefix tuning always).
        cache_start: where this forward's first input lands in the KV cache.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"attention_mask {shape}: prompt and prefix tuning extend a 2-D (batch, length) "
                              f"mask with their virtual tokens; pass the 2-D padding mask", source="attention_mask")
        kwargs["attention_mask"] = fn.prepend_constant(mask, n, 1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        kwargs["position_ids"] = fn.prompt_position_ids(positions, n) if in_inputs else positions + n
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        # Rebuilt, not shifted: callers count it with or without the virtual tokens (transformers
        # 4.x kept its own count; 5.x reads the cache), and the cache is what it must index.
        length = cache_position.shape[-1] + (n if in_inputs else 0)
        kwargs["cache_position"] = torch.arange(cache_start, cache_start + length, device=cache_position.device)
    return kwargs


def batch_size(kwargs: dict[str, Any], method: str) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ConfigError(f"{method} needs input_ids or inputs_embeds in the forward; got neither", source="forward")


def site_of(model: nn.Module, site_class: type[VirtualTokenSite], *args) -> VirtualTokenSite:
    """The model's site of this class, registered as the child `site_class.attribute` if new."""
    site = getattr(model, site_class.attribute, None)
    if site is None:
        site = site_class(*args)
        site.train(model.training)
        model.add_module(site_class.attribute, site)
    return site


def use_prompt_file_keys(model: nn.Module, name: str) -> None:
    """Name adapter `name`'s modules_to_save in files as PEFT's prompt-learning models do."""
    for _, layer in wrapped_layers(model):
        if isinstance(layer, ModulesToSave) and name in layer.adapter_names():
            layer.key_prefixes[name] = PROMPT_PREFIX


def model_dims(model: nn.Module) -> dict[str, int]:
    """Width d, layers L and attention heads H of a transformers model, as PEFT reads them."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config; prompt and prefix tuning need "
                          f"a transformers model (hidden size, layers and heads are read from it)", source="attach")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    found = {key: next((getattr(text, a) for a in names if getattr(text, a, None) is not None), None)
             for key, names in (("width", ("hidden_size", "n_embd", "d_model")),
                                ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
                                ("heads", ("num_attention_heads", "n_head", "num_heads")))}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ConfigError(f"{type(model).__name__}'s config does not say its {', '.join(missing)}", source="attach")
    return found


def task_type(model: nn.Module, saved: list[str]) -> str | None:
    """PEFT's task_type, SEQ_CLS for any classifier: PEFT's plain PeftModel (task_type None) would run
    the base without the prompt. (PEFT then expects the head in the file: save it via modules_to_save.)"""
    found = file_layout.peft_task_type(model, saved)
    if found is None and type(model).__name__.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return found


def check_shared_keys(values: dict[str, Any]) -> list[str]:
    """Problems with the keys of a PEFT prompt-learning config that both methods read."""
    found = []
    if values.get("num_transformer_submodules") not in (None, 1):
        found.append(f"num_transformer_submodules={values['num_transformer_submodules']!r}: an encoder-decoder "
                     f"model's adapter (feathertune supports decoder-only and encoder-only models: 1)")
    return found


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: Any, where: str) -> FilePlan:
    """`prompt_embeddings` and the modules_to_save (base_model.<path>.*); every other key is refused.

    The shape of `prompt_embeddings` is checked by the loader against the attached adapter.
    """
    modules = dict(model.named_modules())
    plan, unplaced = FilePlan(), []
    for key in tensors:
        if key == EMBEDDINGS_KEY:
            continue
        owner = None
        if key.startswith(PROMPT_PREFIX):
            owner = file_layout.saved_owner(key[len(PROMPT_PREFIX):], modules, list(config.modules_to_save))
        if owner is None:
            unplaced.append(f"{key} (neither {EMBEDDINGS_KEY} nor a module in modules_to_save="
                            f"{list(config.modules_to_save)})")
        elif owner not in plan.saved:
            plan.saved.append(owner)
    if unplaced:
        raise file_layout.mismatch(f"{where}: tensors that do not fit this model:", unplaced)
    order = {n: i for i, n in enumerate(modules)}
    plan.saved.sort(key=order.__getitem__)
    return plan
