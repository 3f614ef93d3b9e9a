"""Saving and loading adapters in Hugging Face PEFT's layout.

    adapter_config.json         PEFT's keys and peft_type
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight, ... (no adapter name)

safetensors only: feathertune never unpickles a file. Each file is written to a temporary name in
the same directory and renamed over the target, so a crash never leaves a half-written adapter;
the config is written last, so a directory with a config always has its tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from feathertune.adapters import (
    STATE,
    _attach,
    adapter_state,
    delete_adapter,
    saved_module_names,
    set_active,
    set_trainable,
)
from feathertune.errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from feathertune.files import atomic_write
from feathertune.methods import lora_peft
from feathertune.methods.lora import LoraConfig, LoraLayer
from feathertune.targeting import name_matches
from feathertune.wrapping import wrapped_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (default: the only or the single active one) to `directory`.

    Returns:
        The directory, holding adapter_config.json and adapter_model.safetensors.

    Raises:
        ConfigError: `name` is ambiguous or unknown.
    """
    state = adapter_state(model)
    name = _pick_adapter(state, name)
    config = state.configs[name]
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"saving {type(config).__name__} adapters is not implemented yet", source="save_adapter")
    tensors = peft_tensors(model, name)
    adapted = [n for n, layer in wrapped_layers(model) if isinstance(layer, LoraLayer) and name in layer.lora]
    saved = saved_module_names(model, name)
    peft_config = lora_peft.config_to_peft(model, config, name, adapted, saved)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(text))
    return directory


def peft_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's names: what save_adapter writes."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, layer in wrapped_layers(model):
        if isinstance(layer, LoraLayer) and name in layer.lora:
            for suffix, tensor in lora_peft.adapter_tensors(layer, name).items():
                tensors[f"{PREFIX}{module_name}.{suffix}"] = tensor
    for module_name in saved_module_names(model, name):
        for key, tensor in model.get_submodule(module_name).copies[name].state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = tensor
    return tensors


@torch.no_grad()
def restore_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put tensors saved from this very adapter (a training checkpoint) back into its parameters."""
    missing = sorted(set(peft_tensors(model, name)) - set(tensors))
    if missing:
        raise AdapterMismatchError(f"{where}: lacks {len(missing)} tensors of this run's adapter (first: "
                                   f"{missing[0]}); was the config changed since the checkpoint?")
    for module_name, layer in wrapped_layers(model):
        if isinstance(layer, LoraLayer) and name in layer.lora:
            prefix = f"{PREFIX}{module_name}."
            lora_peft.restore_adapter_tensors(layer, name, {k[len(prefix):]: v for k, v in tensors.items()
                                                            if k.startswith(prefix)})
    for module_name in saved_module_names(model, name):
        copy = model.get_submodule(module_name).copies[name]
        for key, target in copy.state_dict().items():
            target.copy_(tensors[f"{PREFIX}{module_name}.{key}"])


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by feathertune or PEFT) onto `model` and activate it.

    Args:
        name: the name to give the adapter on this model.
        trainable: True to continue training it; False freezes it for inference.

    Returns:
        The same model, changed in place.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        UnsupportedAdapterError: another peft_type, or a PEFT feature feathertune does not implement.
        AdapterMismatchError: the file's tensors do not fit this model (names and shapes listed).
    """
    directory = Path(directory)
    values = _read_config(directory)
    tensors = _read_tensors(directory)
    config_path = str(directory / CONFIG_FILE)
    peft_type = values.get("peft_type")
    if peft_type != lora_peft.PEFT_TYPE:
        raise UnsupportedAdapterError(f"{config_path}: peft_type={peft_type!r} is not supported by feathertune "
                                      f"yet (supported: {lora_peft.PEFT_TYPE!r})")
    lora_peft.check_peft_config(values, config_path)
    config = lora_peft.config_from_peft(values)
    plan = _plan_lora(model, tensors, config, str(directory / WEIGHTS_FILE))
    previous = model.__dict__.get(STATE)
    previous_active = list(previous.active) if previous is not None else None
    _attach(model, config, name, init=False, targets=plan.targets, ranks=plan.ranks, saved=plan.saved)
    try:
        _copy_tensors(model, name, tensors, plan, str(directory / WEIGHTS_FILE))
    except AdapterMismatchError:
        delete_adapter(model, name)  # leave the model as it was
        if previous_active is not None:
            set_active(model, previous_active)
        raise
    set_trainable(model, name, trainable)
    return model


class _Plan:
    def __init__(self):
        self.targets: list[str] = []  # modules with LoRA tensors, in model order
        self.ranks: dict[str, int] = {}
        self.saved: list[str] = []  # modules_to_save found in the file
        self.ignored: list[str] = []  # keys that need no loading (PEFT's copy of a targeted embedding)


def _plan_lora(model: nn.Module, tensors: dict[str, torch.Tensor], config: LoraConfig, where: str) -> _Plan:
    """Which modules the file adapts, with what rank; every key must find its place in the model."""
    modules = dict(model.named_modules())
    plan, unplaced, lora_paths = _Plan(), [], {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            unplaced.append(f"{key} (does not start with {PREFIX!r})")
            continue
        path, suffix = _split_lora_key(key[len(PREFIX):])
        if path is not None:
            lora_paths.setdefault(path, {})[suffix] = tensor
            continue
        owner = _saved_owner(key[len(PREFIX):], modules, config.modules_to_save)
        if owner is not None:
            if owner not in plan.saved:
                plan.saved.append(owner)
        else:
            unplaced.append(key)
    for path, parts in lora_paths.items():
        if path not in modules:
            unplaced.append(f"{PREFIX}{path}.* (this model has no module {path!r})")
        elif "lora_A.weight" not in parts and "lora_embedding_A" not in parts:
            if set(parts) == {lora_peft.EMBEDDING_COPY}:
                plan.ignored.append(path)  # PEFT saves a targeted embedding's base weight; we keep ours
            else:
                unplaced.append(f"{PREFIX}{path}.* (no lora_A tensor for this module)")
    if unplaced:
        raise _mismatch(f"{where}: tensors that do not fit this model:", unplaced)
    order = {n: i for i, n in enumerate(modules)}
    plan.targets = sorted((p for p in lora_paths if p not in plan.ignored), key=order.__getitem__)
    for path in plan.targets:
        A = lora_paths[path].get("lora_A.weight", lora_paths[path].get("lora_embedding_A"))
        plan.ranks[path] = A.shape[0]
    plan.saved.sort(key=order.__getitem__)
    return plan


def _split_lora_key(rest: str) -> tuple[str | None, str]:
    """('<module path>', suffix) for a LoRA tensor key, or (None, '') for anything else."""
    for suffix in lora_peft.FILE_SUFFIXES:
        if rest.endswith("." + suffix):
            path = rest[: -len(suffix) - 1]
            if suffix == lora_peft.LEGACY_MAGNITUDE:
                suffix = lora_peft.TENSOR_SUFFIXES["magnitude"]
            return path, suffix
    return None, ""


def _saved_owner(rest: str, modules: dict[str, nn.Module], modules_to_save: list[str]) -> str | None:
    """The modules_to_save module a key like 'classifier.dense.weight' belongs to, if any."""
    parts = rest.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in modules and name_matches(prefix, modules_to_save):
            return prefix
    return None


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], plan: _Plan, where: str) -> None:
    """Copy every tensor into the freshly attached adapter, after checking all shapes at once."""
    expected: dict[str, torch.Tensor] = {}
    for path in plan.targets:
        layer = model.get_submodule(path)
        adapter = layer.lora[name]
        fields = {"A": adapter.A, "B": adapter.B, "magnitude": adapter.magnitude, "bias": adapter.bias}
        for field, suffix in lora_peft.suffixes(layer).items():
            if fields[field] is not None:
                expected[f"{PREFIX}{path}.{suffix}"] = fields[field]
    for path in plan.saved:
        copy = model.get_submodule(path).copies[name]
        expected.update({f"{PREFIX}{path}.{k}": v for k, v in copy.state_dict().items()})
    problems = [f"{k}: missing from the file, the model needs shape {tuple(v.shape)}"
                for k, v in expected.items() if k not in tensors]
    for key, tensor in tensors.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{key}: file has shape {tuple(tensor.shape)}, this model needs "
                            f"{tuple(expected[key].shape)}")
    for path in plan.ignored:
        key = f"{PREFIX}{path}.{lora_peft.EMBEDDING_COPY}"
        ours = model.get_submodule(path)
        ours = getattr(ours, "base", ours).weight
        if tuple(tensors[key].shape) != tuple(ours.shape):
            problems.append(f"{key}: file has shape {tuple(tensors[key].shape)}, this model's is {tuple(ours.shape)}")
    if problems:
        raise _mismatch(f"{where}: the adapter does not fit this model:", problems)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))


def _mismatch(header: str, lines: list[str], shown: int = 20) -> AdapterMismatchError:
    listing = "\n".join(f"  - {line}" for line in lines[:shown]) + ("\n  …" if len(lines) > shown else "")
    return AdapterMismatchError(f"{header}\n{listing}\nIs this adapter for another base model?")


def _pick_adapter(state, name: str | None) -> str:
    if name is not None:
        if name not in state.configs:
            raise ConfigError(f"no adapter named {name!r}; attached: {', '.join(state.configs)}",
                              source="save_adapter")
        return name
    if len(state.configs) == 1:
        return next(iter(state.configs))
    if len(state.active) == 1:
        return state.active[0]
    raise ConfigError(f"several adapters are attached ({', '.join(state.configs)}); pass name=... to "
                      f"choose the one to save", source="save_adapter")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", source=str(path)) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}", source=str(path))
    return values


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (f"; found {', '.join(pickled)}, a pickle, which feathertune never loads for safety — "
                f"convert it to safetensors in a trusted environment") if pickled else ""
        raise FileNotFoundError(f"{path}: missing{hint}")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}
