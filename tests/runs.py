"""Training-run fixtures for the pipeline and CLI tests: a tiny chat model with a slice of E2E, a
slice of SST-2, config files, and a run killed with SIGKILL part-way through."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from models import tiny_chat_model_dir
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "data" / "e2e"
SST2 = REPO / "data" / "sst2"


def make_workspace(root: Path):
    """A tiny chat model, 48 E2E training examples, 4 validation MRs, and a config using them."""
    train_lines = (E2E / "train.jsonl").read_text().splitlines()[:48]
    val_lines = (E2E / "validation.jsonl").read_text().splitlines()[:4]
    (root / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (root / "validation.jsonl").write_text("\n".join(val_lines) + "\n")
    corpus = [m["content"] for line in train_lines for m in json.loads(line)["messages"]]
    tiny_chat_model_dir(root / "model", corpus)
    config = {
        "model": str(root / "model"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl"),
                 "max_length": 256},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "checkpoint_every": 2,
                  "seed": 3},
        "eval": {"max_new_tokens": 8, "batch_size": 4, "samples": 1},
    }
    return root, config


def sst2_slice(root: Path, train_rows: int = 64, dev_rows: int = 20) -> tuple[Path, Path]:
    """The first SST-2 training sentences and a few others as a dev set, as TSV files in `root`."""
    rows = (SST2 / "train.tsv").read_text().splitlines()
    train, dev = root / "sst-train.tsv", root / "sst-dev.tsv"
    train.write_text("\n".join(rows[: train_rows + 1]) + "\n")
    dev.write_text("\n".join([rows[0]] + rows[100:100 + dev_rows]) + "\n")
    return train, dev


def write_config(root: Path, config: dict, name: str, **sections) -> Path:
    """`config` with some sections merged over (dicts) or replaced (values), written as name.yaml."""
    merged = json.loads(json.dumps(config))
    for key, value in sections.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metric_steps(run: Path) -> list[int]:
    """The steps of metrics.jsonl's training records, in file order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def train_until_killed(arguments: list[str], checkpoints: int = 2, timeout: int = 300):
    """Run `feathertune train ARGUMENTS` in a subprocess and SIGKILL it on the step after its
    `checkpoints`-th checkpoint, as a crash or an out-of-memory kill would. Returns the process."""
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from feathertune.train import state, loop
        saves = []
        original = state.save_checkpoint
        def save_then_count(*args, **kwargs):
            saves.append(original(*args, **kwargs))
            return saves[-1]
        state.save_checkpoint = save_then_count
        original_step = loop._train_step
        def step(*args, **kwargs):
            if len(saves) == {checkpoints}:  # the step after that checkpoint: die mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(*args, **kwargs)
        loop._train_step = step
        from feathertune.cli import main
        sys.exit(main(["train", *{arguments!r}]))
    """)
    return subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=timeout)
