"""Saving and loading adapters in Hugging Face PEFT's layout, for every method.

    adapter_config.json         PEFT's keys and peft_type
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight, ... (no adapter name)

The method's registry row maps its config to the JSON and back and reads a file's plan (which
modules, what sizes); each site names its own tensors. This file only writes, reads and checks.

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

from feathertune import file_layout
from feathertune.adapters import STATE, _attach, adapter_state, delete_adapter, set_active, set_trainable
from feathertune.errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from feathertune.file_layout import CONFIG_FILE, WEIGHTS_FILE
from feathertune.files import atomic_write
from feathertune.registry import METHODS, spec_for, spec_for_peft_type
from feathertune.saved_modules import ModulesToSave
from feathertune.wrapping import adapter_sites


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
    tensors = adapter_file_tensors(model, name)
    holding = [path for path, site in adapter_sites(model) if name in site.adapter_names()]
    saved = [path for path in holding if isinstance(model.get_submodule(path), ModulesToSave)]
    sites = [path for path in holding if path not in saved]
    values = spec_for(config).config_to_file(model, config, name, sites, saved)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(text))
    return directory


def adapter_file_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under their file names, from every site that holds it."""
    tensors: dict[str, torch.Tensor] = {}
    for path, site in adapter_sites(model):
        if name in site.adapter_names():
            tensors.update(site.file_tensors(name, path))
    return tensors


@torch.no_grad()
def restore_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put tensors saved from this very adapter (a training checkpoint) back into its parameters."""
    missing = sorted(set(adapter_file_tensors(model, name)) - set(tensors))
    if missing:
        raise AdapterMismatchError(f"{where}: lacks {len(missing)} tensors of this run's adapter (first: "
                                   f"{missing[0]}); was the config changed since the checkpoint?")
    _load_into_sites(model, name, tensors)


def _load_into_sites(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for path, site in adapter_sites(model):
        if name in site.adapter_names():
            site.load_file_tensors(name, path, tensors)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load an adapter in PEFT's format (saved by feathertune or PEFT) onto `model` and activate it.

    Args:
        name: the name to give the adapter on this model.
        trainable: True to continue training it; False freezes it for inference.

    Returns:
        The same model, changed in place.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        UnsupportedAdapterError: a peft_type feathertune lacks, or a PEFT feature it does not implement.
        AdapterMismatchError: the file's tensors do not fit this model (names and shapes listed).
    """
    directory = Path(directory)
    values = _read_config(directory)
    tensors = _read_tensors(directory)
    config_path, weights_path = str(directory / CONFIG_FILE), str(directory / WEIGHTS_FILE)
    peft_type = values.get("peft_type")
    spec = spec_for_peft_type(peft_type)
    if spec is None:
        raise UnsupportedAdapterError(f"{config_path}: peft_type={peft_type!r} is not a method feathertune "
                                      f"has; it loads {', '.join(repr(s.peft_type) for s in METHODS.values())}")
    config = spec.config_from_file(values, config_path)
    plan = spec.plan_from_file(model, tensors, config, weights_path)
    tensors = {plan.renamed.get(k, k): v for k, v in tensors.items() if k not in plan.ignored}
    previous = model.__dict__.get(STATE)
    previous_active = list(previous.active) if previous is not None else None
    _attach(model, config, name, init=False, plan=plan)
    try:
        _check_shapes(adapter_file_tensors(model, name), tensors, weights_path)
    except AdapterMismatchError:
        delete_adapter(model, name)  # leave the model as it was
        if previous_active is not None:
            set_active(model, previous_active)
        raise
    _load_into_sites(model, name, tensors)
    set_trainable(model, name, trainable)
    return model


def _check_shapes(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the attached adapter needs is in the file with its shape, and nothing else is."""
    problems = [f"{k}: missing from the file, the model needs shape {tuple(v.shape)}"
                for k, v in expected.items() if k not in tensors]
    for key, tensor in tensors.items():
        if key not in expected:
            problems.append(f"{key}: in the file, but this adapter has no such tensor")
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{key}: file has shape {tuple(tensor.shape)}, this model needs "
                            f"{tuple(expected[key].shape)}")
    if problems:
        raise file_layout.mismatch(f"{where}: the adapter does not fit this model:", problems)


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
