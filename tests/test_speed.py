"""`feathertune bench speed` on the tiny chat model: both contestants train in their own process on
the same batches, and their first-step losses agree (the same maths, measured two ways)."""

from __future__ import annotations

import json

import pytest
from runs import make_workspace

pytest.importorskip("peft")


def test_the_contestants_train_the_same_rows_to_the_same_first_loss(tmp_path):
    """In this process (the whole bench, a process per contestant, is in the slow tier below)."""
    from feathertune.speed import _contestant

    root, _ = make_workspace(tmp_path)
    model, data = str(root / "model"), str(root / "train.jsonl")
    results = {name: _contestant(name, model, data, steps=1, batch=4) for name in ("peft", "trl", "feathertune")}
    for name, result in results.items():
        assert len(result["losses"]) == 2 and result["examples_per_s"] > 0 and result["peak_rss_mib"] > 0, name
    first = results["peft"]["losses"][0]
    assert abs(results["feathertune"]["losses"][0] - first) < 1e-5 * abs(first)
    assert abs(results["trl"]["losses"][0] - first) < 1e-4  # TRL averages in its own order


@pytest.mark.slow  # eight training processes and the decoding benchmark: about two minutes
def test_bench_speed_compares_the_same_training_in_two_processes(tmp_path):
    from feathertune.speed import run_speed

    root, _ = make_workspace(tmp_path)
    lines = []
    report = run_speed(str(root / "model"), steps=2, batch=4, data=str(root / "train.jsonl"), out=str(tmp_path / "out"),
                       say=lines.append)
    assert report["first_loss_relative_gap"] < 1e-5  # PEFT's loss and ours, on the same rows
    for name in ("peft", "trl", "feathertune", "peft-dora", "feathertune-dora", "full"):
        result = report["results"][name]
        assert len(result["losses"]) == 3 and result["examples_per_s"] > 0 and result["peak_rss_mib"] > 0
    # TRL's SFTTrainer trains on the same rows in the same order: its first loss is the same number.
    assert abs(report["results"]["trl"]["losses"][0] - report["results"]["peft"]["losses"][0]) < 1e-4
    assert report["dora_over_lora_step"]["feathertune"] > 0 and report["inference"]["matmul_gflops"]["fp32"] > 0
    assert json.loads((tmp_path / "out" / "speed.json").read_text())["throughput_ratio"] == report["throughput_ratio"]
    assert "feathertune / PEFT: throughput" in lines[-1]
    per_token = report["inference"]["seconds_per_token"]
    assert set(per_token) == {"base", "feathertune_unmerged", "feathertune_merged", "peft_unmerged", "peft_merged"}
    assert all(t > 0 for t in per_token.values()) and report["inference"]["mixed_batch_seconds"]["four_adapters"] > 0


@pytest.mark.slow  # 6 training processes; the contestants themselves are in the default suite above
def test_bench_speed_sweep_writes_a_table_and_a_plot(tmp_path):
    from feathertune.speed import run_sweep

    root, _ = make_workspace(tmp_path)
    out = tmp_path / "out"
    report = run_sweep(str(root / "model"), steps=1, data=str(root / "train.jsonl"), out=str(out), say=lambda *_: None,
                       lengths=(16, 64), batches=(2,))
    points = [(p["batch"], p["length"]) for p in report["sweep"]]
    assert points == [(4, 16), (4, 64), (2, 256)]
    for point in report["sweep"]:
        assert all(point[n]["tokens_per_s"] > 0 and point[n]["peak_rss_mib"] > 0 for n in ("peft", "feathertune"))
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + len(points) and table[2].startswith("| 4 | 16 |")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
