"""`train.distributed: fsdp` (FSDP2) on the CPU: two torchrun processes (gloo) train the same run as
one process, step for step, and write the same adapter file; a sharded run killed with SIGKILL
resumes from its checkpoint and ends where an unbroken run does.

Same global batch (8) everywhere: one process × 4 × grad_accum 2 against two × 4 × grad_accum 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runs import make_workspace, metric_steps, write_config

import feathertune as ft
from feathertune.errors import ConfigError

TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun", path=str(TORCHRUN.parent)) is None,
                                    reason="torchrun is not installed beside this Python")
WEIGHTS = Path("adapter") / "adapter_model.safetensors"
STEPS = 6
# One process of the sharded run kills itself as it starts this step, after checkpoint step-000004.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from feathertune.train import loop
    original = loop._Training.step
    def step(self, step):
        if step == 4 and self.procs.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step)
    loop._Training.step = step
    from feathertune.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The workspace and a single-process run (grad_accum 2) that every sharded run is held to."""
    root, config = make_workspace(tmp_path_factory.mktemp("fsdp"))
    config = {**config, "train": {**config["train"], "max_steps": STEPS, "batch_size": 4, "checkpoint_every": 2},
              "eval": {**config["eval"], "compare_base": False}}
    single = root / "runs" / "one-process"
    cfg = write_config(root, config, "one", output=str(single), train={"grad_accum": 2})
    _run_alone(cfg)
    return root, config, single


def test_an_unknown_distributed_strategy_is_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError) as caught:
        ft.TrainConfig.from_dict({"data": {"train": "x.jsonl"}, "train": {"distributed": "bogus"}})
    message = str(caught.value)
    assert "train.distributed='bogus'" in message and "ddp" in message and "fsdp" in message


def test_bitsandbytes_optimizers_are_refused_under_fsdp():
    """Their kernels take whole tensors; FSDP hands them DTensor shards (NotImplementedError at step 1)."""
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit .* use train.optimizer=adamw"):
        ft.TrainConfig.from_dict({"data": {"train": "x.jsonl"},
                                  "train": {"distributed": "fsdp", "optimizer": "adamw_8bit"}})


@needs_torchrun
def test_two_sharded_processes_train_exactly_as_one(workspace):
    root, config, single = workspace
    sharded = root / "runs" / "fsdp"
    cfg = write_config(root, config, "fsdp", output=str(sharded), train={"grad_accum": 1, "distributed": "fsdp"})
    done = _torchrun(["-m", "feathertune.cli", "train", str(cfg)])
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(single, sharded)
    # Checkpoints keep today's layout, written from the gathered (full) tensors.
    for step in ("step-000002", "step-000004"):
        one, two = single / "checkpoints" / step, sharded / "checkpoints" / step
        assert sorted(p.name for p in two.iterdir()) == ["adapter", "trainer.json", "trainer.safetensors"]
        assert (two / WEIGHTS).read_bytes() == (one / WEIGHTS).read_bytes()


@needs_torchrun
def test_a_killed_sharded_run_resumes_to_the_same_adapter(workspace, tmp_path):
    root, config, single = workspace
    out = root / "runs" / "fsdp-killed"
    cfg = write_config(root, config, "fsdp-killed", output=str(out), train={"grad_accum": 1, "distributed": "fsdp"})
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = _torchrun([str(killer), str(cfg)])
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    resumed = _torchrun(["-m", "feathertune.cli", "train", str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metric_steps(out) == list(range(1, STEPS + 1))  # nothing duplicated or lost around the kill
    _assert_same_run(single, out)


def _assert_same_run(single: Path, sharded: Path) -> None:
    """The loss of every step within 1e-4 (relative), and the adapter file byte for byte: the
    gradients are the same sums of the same micro-batches, so nothing but the order of adding up
    could differ, and per-block FSDP groups keep autograd's order (see train/fsdp.py)."""
    one, two = _curve(single), _curve(sharded)
    assert len(one) == len(two) == STEPS
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, two)), (one, two)
    assert (sharded / WEIGHTS).read_bytes() == (single / WEIGHTS).read_bytes()
    config = Path("adapter") / "adapter_config.json"
    assert (sharded / config).read_text() == (single / config).read_text()


def _curve(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _env() -> dict[str, str]:
    # One thread per process, in the single-process run too: the matmuls then add up in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_alone(cfg: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "feathertune.cli", "train", str(cfg)], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]


def _torchrun(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *arguments], capture_output=True,
                          text=True, timeout=300, env=_env())


@pytest.mark.slow
@needs_torchrun
def test_a_sharded_qlora_run_trains_as_one_process(workspace):
    """QLoRA under FSDP: the 4-bit codes sharded as float32 (quant_storage), each layer's
    quantization state kept; same curve and adapter as one process with the codes in uint8."""
    root, config, _ = workspace
    short = {"max_steps": 2, "checkpoint_every": 0}
    single, sharded = root / "runs" / "qlora-one", root / "runs" / "qlora-fsdp"
    _run_alone(write_config(root, config, "qlora-one", output=str(single), quantize="nf4",
                            train={**short, "grad_accum": 2}))
    cfg = write_config(root, config, "qlora-fsdp", output=str(sharded), quantize="nf4",
                       train={**short, "grad_accum": 1, "distributed": "fsdp"})
    done = _torchrun(["-m", "feathertune.cli", "train", str(cfg)])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _curve(single), _curve(sharded)
    assert len(one) == len(two) == 2 and all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, two)), (one, two)
    assert (sharded / WEIGHTS).read_bytes() == (single / WEIGHTS).read_bytes()
