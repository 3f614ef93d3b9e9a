"""Resumable checkpoints: everything a killed run needs to end exactly where an unbroken one would.

    checkpoints/step-000050/
        adapter/                 the adapter in PEFT format (loadable on its own)
        trainer.safetensors      optimizer tensors, RNG states, the adapter's parameters as they train
        trainer.json             step, optimizer hyper-parameters, scheduler, Python RNG

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory
named step-N is always complete; a kill mid-write leaves only a temporary directory, which the next
run removes. safetensors and JSON only: nothing is unpickled on resume.

A sharded (FSDP) run writes the same files, from full tensors that every process gathered first
(see fsdp.py), so it resumes sharded or not, on any number of processes; on resume each process
keeps its shard of the full tensors read.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from feathertune.adapters import adapter_parameters
from feathertune.checkpoint import restore_tensors, save_adapter
from feathertune.errors import AdapterMismatchError
from feathertune.file_layout import WEIGHTS_FILE
from feathertune.train import fsdp

_STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTER_KEY = "adapter/"  # trainer.safetensors: the adapter's parameters, in the sites' order


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer_state: dict[str, Any],
                    scheduler: torch.optim.lr_scheduler.LRScheduler, keep: int, extra: dict[str, Any]) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest `keep` checkpoints.

    `optimizer_state` is the optimizer's state_dict() with full tensors (fsdp.full_optimizer_state),
    and a sharded `model` is inside fsdp.gathered: this writes what it is given, on one process.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter")
    tensors, meta = _optimizer_to_flat(optimizer_state)
    # The adapter's parameters as they train, beside the file that holds them as they deploy: the two
    # differ where a method folds its training form away on saving (prefix tuning's MLP).
    for index, param in enumerate(adapter_parameters(model, "default")):
        tensors[f"{ADAPTER_KEY}{index:05d}"] = param.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    save_file(tensors, str(tmp / "trainer.safetensors"))
    record = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(),
              "python_rng": _jsonable(random.getstate()), **extra}
    (tmp / "trainer.json").write_text(json.dumps(record, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(checkpoints(run_dir))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def checkpoints(run_dir: Path, *, clean: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; removes torn temporary ones, unless
    `clean=False` (an onlooker, such as the service's worker, while the run may be writing one)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if clean:
                shutil.rmtree(path, ignore_errors=True)  # a kill mid-write
            continue
        match = _STEP_DIR.match(path.name)
        if match and (path / "trainer.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_record(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json: its step, and what the loop stored beside it (total_steps, epoch)."""
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNGs from `path`; returns trainer.json.
    A sharded model's parameters and the optimizer's moments each keep this process's shard."""
    record = read_record(path)
    tensors = load_file(str(path / "trainer.safetensors"))
    _copy_adapter_weights(model, path, tensors)
    saved = _optimizer_from_flat(tensors, record["optimizer"])
    optimizer.load_state_dict(fsdp.placed_optimizer_state(optimizer, saved))
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(record["python_rng"]))
    return record


def _copy_adapter_weights(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Put the checkpoint's adapter back into the model's (already attached, trainable) adapter:
    its parameters exactly as they trained, or (checkpoints from before they were kept) its file."""
    saved = [tensors[k] for k in sorted(tensors) if k.startswith(ADAPTER_KEY)]
    if not saved:
        adapter_dir = path / "adapter"
        restore_tensors(model, "default", load_file(str(adapter_dir / WEIGHTS_FILE)), str(adapter_dir))
        return
    params = adapter_parameters(model, "default")
    if [tuple(t.shape) for t in saved] != [tuple(p.shape) for p in params]:
        raise AdapterMismatchError(f"{path}: holds {len(saved)} adapter tensors that do not fit this run's "
                                   f"{len(params)} adapter parameters; was the config changed since the checkpoint?")
    with torch.no_grad():
        for param, value in zip(params, saved):
            param.copy_(fsdp.placed(param, value))


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = tensor
    for key, value in meta["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value):
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_tupled(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_tupled(v) for v in value]
    return value
