"""`feathertune bench speed` on the tiny chat model: both contestants train in their own process on
the same batches, and their first-step losses agree (the same maths, measured two ways)."""

from __future__ import annotations

import json

import pytest
from runs import make_workspace

pytest.importorskip("peft")


def test_bench_speed_compares_the_same_training_in_two_processes(tmp_path):
    from feathertune.speed import run_speed

    root, _ = make_workspace(tmp_path)
    lines = []
    report = run_speed(str(root / "model"), steps=2, batch=4, data=str(root / "train.jsonl"), out=str(tmp_path / "out"),
                       say=lines.append)
    assert report["first_loss_relative_gap"] < 1e-5  # PEFT's loss and ours, on the same rows
    for name in ("peft", "feathertune"):
        result = report["results"][name]
        assert len(result["losses"]) == 3 and result["examples_per_s"] > 0 and result["peak_rss_mib"] > 0
    assert json.loads((tmp_path / "out" / "speed.json").read_text())["throughput_ratio"] == report["throughput_ratio"]
    assert "feathertune / PEFT: throughput" in lines[-1]
    per_token = report["inference"]["seconds_per_token"]
    assert set(per_token) == {"base", "feathertune_unmerged", "feathertune_merged", "peft_unmerged", "peft_merged"}
    assert all(t > 0 for t in per_token.values()) and report["inference"]["mixed_batch_seconds"]["four_adapters"] > 0
