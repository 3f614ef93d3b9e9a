"""Model-level adapter operations: attach, activate, disable, delete, merge and unmerge.

feathertune changes the user's model in place (wrapping the targeted layers) instead of wrapping the
whole model in a new class, so the model keeps its type: a `transformers` model still generates,
saves and trains under `Trainer`. What feathertune needs to remember lives in one small object at
`model._feathertune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from feathertune.config import MethodConfig
from feathertune.errors import ConfigError
from feathertune.file_layout import FilePlan
from feathertune.registry import spec_for
from feathertune.saved_modules import ModulesToSave, attach_saved_modules
from feathertune.wrapping import (
    BASE,
    ForwardContext,
    WrappedLayer,
    adapter_sites,
    cache_argument,
    model_sites,
    replace_module,
    wrapped_layers,
)

STATE = "_feathertune"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclasses.dataclass
class AdapterState:
    """What feathertune knows about the adapters on one model."""

    configs: dict[str, MethodConfig] = dataclasses.field(default_factory=dict)
    modules: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # adapted module names
    active: list[str] = dataclasses.field(default_factory=list)
    context: ForwardContext = dataclasses.field(default_factory=ForwardContext)  # shared by every site


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's adapter bookkeeping; raises a clear error if nothing was attached."""
    state = model.__dict__.get(STATE)
    if state is None:
        raise ConfigError("this model has no feathertune adapters; call ft.attach(model, config) "
                          "or ft.load_adapter(model, dir) first", source="model")
    return state


def attach(model: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to `model` (in place), make it the active one, and freeze the rest.

    Every parameter that is not an adapter's is frozen; the new adapter's parameters train;
    adapters attached earlier keep their trainable flag.

    Args:
        config: a method config, e.g. `LoraConfig(r=16, target_modules="all-linear")`.
        name: the adapter's name, used by set_active, delete_adapter, save_adapter and mixed batches.

    Returns:
        The same model, so that `model = ft.attach(model, cfg)` reads naturally.

    Raises:
        ConfigError: invalid config, or an adapter with this name already exists.
        TargetError: target_modules matched nothing usable (the message lists what exists).
    """
    _attach(model, config, name, init=True)
    set_trainable(model, name, True)
    return model


def _attach(model: nn.Module, config: MethodConfig, name: str, *, init: bool,
            plan: FilePlan | None = None) -> None:
    """attach() without the freezing, also used by load_adapter with a plan read from the file."""
    config.validate()
    state = model.__dict__.get(STATE) or AdapterState()
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE:
        raise ConfigError(f"adapter name {name!r} must start with a letter or '_' and contain only "
                          f"letters, digits, '_' and '-' (and not be {BASE!r})", source="attach")
    if name in state.configs:
        raise ConfigError(f"an adapter named {name!r} is already attached (adapters: "
                          f"{', '.join(state.configs)}); pick another name or ft.delete_adapter it first",
                          source="attach")
    if any(site.is_merged() for _, site in adapter_sites(model)):
        raise ConfigError("the model has merged adapters; call ft.unmerge(model) before attaching",
                          source="attach")
    spec = spec_for(config)
    modules_to_save = list(getattr(config, "modules_to_save", None) or [])
    # Wrap modules_to_save first, so that the method's targeting steps around them.
    saved_names = attach_saved_modules(model, modules_to_save if plan is None else plan.saved, name,
                                       strict=plan is None)
    try:
        adapted = spec.attach(model, config, name, init=init, plan=plan)
    except Exception:
        _remove_from_sites(model, name)
        raise
    state.configs[name] = config
    state.modules[name] = adapted + saved_names
    model.__dict__[STATE] = state
    for _, site in adapter_sites(model):
        site.context = state.context
    if _before_forward not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_before_forward, with_kwargs=True)
        model.register_forward_hook(_after_forward)
    set_active(model, [name])


def _remove_from_sites(model: nn.Module, name: str) -> None:
    """Take adapter `name` off every site; a site left with no adapter goes (layers: the original back)."""
    # Innermost first, so that taking a site out never changes the path of one still to visit.
    for site_name, site in sorted(adapter_sites(model), key=lambda kv: -kv[0].count(".")):
        if name in site.adapter_names():
            site.delete_adapter(name)
        if not site.adapter_names():
            parent_name, _, child = site_name.rpartition(".")
            if isinstance(site, WrappedLayer):
                replace_module(model, site_name, site.base)
            else:
                delattr(model.get_submodule(parent_name) if parent_name else model, child)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s parameters, from every site that holds it (what training updates), each once
    (tied tensors of partial fine-tuning share one parameter between two sites)."""
    found = {id(p): p for _, site in adapter_sites(model) for p in site.adapter_parameters(name)}
    return list(found.values())


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Freeze every non-adapter parameter; set adapter `name`'s parameters to `trainable`."""
    mine = {id(p) for p in adapter_parameters(model, name)}
    any_adapter = {id(p) for _, site in adapter_sites(model)
                   for n in site.adapter_names() for p in site.adapter_parameters(n)}
    for param in model.parameters():
        if id(param) in mine:
            param.requires_grad_(trainable)
        elif id(param) not in any_adapter:
            param.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter counted once even if shared."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        # bitsandbytes packs two 4-bit values per byte; its Params4bit knows the real count.
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            count = int(torch.Size(quant_state.shape).numel())
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Choose which adapters run; the outputs of several active adapters add up.

    Raises:
        ConfigError: an unknown name, or the model is merged (unmerge first).
    """
    state = adapter_state(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; attached: {', '.join(state.configs) or 'none'}",
                          source="set_active")
    if any(site.is_merged() for _, site in adapter_sites(model)):
        raise ConfigError("cannot change the active adapters while merged; call ft.unmerge(model) first",
                          source="set_active")
    state.active = names
    for _, site in adapter_sites(model):
        site.active = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    return list(adapter_state(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model behaves exactly as the base (merged weights are undone meanwhile)."""
    sites = [site for _, site in adapter_sites(model)]
    remerge = [site for site in sites if site.is_merged()]
    for site in remerge:
        site.unmerge()
    for site in sites:
        site.disabled = True
    try:
        yield model
    finally:
        for site in sites:
            site.disabled = False
        for site in remerge:
            site.merge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter go back to their original module."""
    state = adapter_state(model)
    if name not in state.configs:
        raise ConfigError(f"no adapter named {name!r}; attached: {', '.join(state.configs)}",
                          source="delete_adapter")
    if any(site.is_merged() for _, site in adapter_sites(model)):
        raise ConfigError("cannot delete an adapter while merged; call ft.unmerge(model) first",
                          source="delete_adapter")
    _remove_from_sites(model, name)
    del state.configs[name]
    del state.modules[name]
    state.active = [n for n in state.active if n != name]
    if not state.configs:
        _forget(model)


def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold the active adapters into the base weights.

    Args:
        unload: True (default) returns a plain model with no wrappers and no feathertune state, ready
            for `save_pretrained`. False keeps the wrappers so that `ft.unmerge` restores the base.

    Returns:
        The same model object, changed in place. Merging an already merged model changes nothing.

    Raises:
        ConfigError: an active adapter's method cannot be merged.
    """
    state = adapter_state(model)
    for name in state.active:
        if not spec_for(state.configs[name]).mergeable:
            raise ConfigError(f"adapter {name!r} ({type(state.configs[name]).__name__}) cannot be merged "
                              f"into the weights; keep it attached for inference", source="merge")
    _untie_merged_weights(model)
    for _, layer in wrapped_layers(model):
        layer.merge()
    if unload:
        # Innermost first, so that replacing a wrapper never invalidates a name still to visit.
        for layer_name, layer in sorted(wrapped_layers(model), key=lambda kv: -kv[0].count(".")):
            replace_module(model, layer_name, layer.unwrapped())
        for site in list(model_sites(model)):  # inactive prompt adapters go with the rest of the state
            delattr(model, site.attribute)
        _forget(model)
    return model


def _untie_merged_weights(model: nn.Module) -> None:
    """Give a merging layer its own copy of a weight it shares (e.g. lm_head tied to the embeddings).

    Otherwise folding the update into the output head would change the input embeddings too.
    The model's config is told, so that `save_pretrained` and reloading keep the two apart.
    """
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, layer in wrapped_layers(model):
        weight = getattr(layer.base, "weight", None)
        if not layer.is_merged() and isinstance(weight, nn.Parameter) and uses.get(id(weight), 0) > 1 \
                and "weight" in layer.merges_into():
            warnings.warn(f"{name}.weight is shared with another module (tied embeddings); merging gives "
                          f"{name} its own copy so the other module keeps the original weights", stacklevel=3)
            layer.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge(model, unload=False)`: the base weights are restored and adapters run separately."""
    adapter_state(model)
    for _, layer in wrapped_layers(model):
        layer.unmerge()
    return model


def _forget(model: nn.Module) -> None:
    """Drop the adapter state and the forward hooks. The hooks are found by function, not kept as
    handles, so that a deep copy of an adapted model (ft.interpolate makes some) owns its own."""
    model.__dict__.pop(STATE, None)
    for hooks, hook in ((model._forward_pre_hooks, _before_forward), (model._forward_hooks, _after_forward)):
        for key in [k for k, f in hooks.items() if f is hook]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: fill the shared context, then let model-level sites rewrite the inputs.

    `model(..., adapter_names=[...])` runs one adapter per row of the batch; `prompt_lengths=` (B,)
    says how many of each row's real tokens are the prompt (ReFT edits prompt positions only).
    """
    names = kwargs.pop("adapter_names", None)
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    state = adapter_state(model)
    context = state.context
    if names is not None:
        _check_batch_names(model, names, args, kwargs)
    sites = list(model_sites(model))
    if sites and args:  # the sites rewrite inputs by name: name the positional ones
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
        args, kwargs = (), dict(bound.arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
    context.adapter_names = None if names is None else list(names)  # reset after a mixed batch too
    context.prompt_lengths = prompt_lengths  # None when not given: every real token is the prompt
    context.attention_mask = kwargs.get("attention_mask")
    cache = cache_argument(kwargs)
    context.past_length = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    context.decoding = context.past_length > 0
    for site in sites:
        kwargs = site.prepare_inputs(model, kwargs)
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, output):
    for site in model_sites(model):
        output = site.finish_outputs(output)
    return output


def _check_batch_names(model, names, args, kwargs) -> None:
    known = set(adapter_state(model).configs) | {BASE}
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        raise ConfigError(f"adapter_names has unknown adapter(s) {unknown}; attached: "
                          f"{', '.join(sorted(known - {BASE}))}, or {BASE!r} for the base model",
                          source="adapter_names")
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is not None and first.dim() > 0 and first.shape[0] != len(names):
        raise ConfigError(f"adapter_names has {len(names)} entries but the batch has {first.shape[0]} "
                          f"rows; give one adapter name per row", source="adapter_names")
    sites = [site for _, site in adapter_sites(model)]
    if any(site.is_merged() for site in sites):
        raise ConfigError("mixed-batch inference needs unmerged adapters; call ft.unmerge(model) first",
                          source="adapter_names")
    configs = adapter_state(model).configs
    refused = sorted({n for n in names if n in configs and not spec_for(configs[n]).mixed_batch})
    if refused:
        kinds = ", ".join(f"{n} ({type(configs[n]).__name__})" for n in refused)
        raise ConfigError(f"adapter_names: {kinds} cannot run in a mixed batch (the method changes the "
                          f"sequence or the attention itself, for every row at once); run those rows in a "
                          f"batch of their own with ft.set_active", source="adapter_names")


def saved_module_names(model: nn.Module, name: str) -> list[str]:
    """Full names of the modules_to_save wrappers that hold a copy for adapter `name`."""
    return [n for n, layer in wrapped_layers(model) if isinstance(layer, ModulesToSave)
            and name in layer.adapter_names()]
