"""feathertune.train.metrics: the metrics.jsonl log (append, resume, torn lines) and the loss plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from feathertune.errors import DataError
from feathertune.train.metrics import MetricsLog, plot_losses, read_metrics, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, steps, eval_every=0):
    with MetricsLog(path) as log:
        for step in steps:
            log.write({"step": step, "loss": 3.0 / step})
            if eval_every and step % eval_every == 0:
                log.write({"step": step, "eval_loss": 3.2 / step})


def test_records_are_flushed_as_written(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-4})
    assert read_metrics(path) == [{"step": 1, "loss": 2.5, "lr": 1e-4}]  # before close
    log.close()
    assert path.read_text().count("\n") == 1


def test_a_new_run_starts_the_file_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path, [1, 2, 3])
    write_run(path, [1, 2])
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path, range(1, 8), eval_every=2)
    with path.open("a") as f:
        f.write('{"step": 8, "lo')  # the run was killed mid-write
    with MetricsLog(path, resume_from_step=4) as log:
        assert [(r["step"], "eval_loss" in r) for r in read_metrics(path)] == [
            (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
        for step in (5, 6):
            log.write({"step": step, "loss": 0.1})
    steps = [r["step"] for r in read_metrics(path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicates, no orphans, no torn fragment
    assert all(line.startswith("{") for line in path.read_text().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_without_a_file_creates_it(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl", resume_from_step=10) as log:
        log.write({"step": 11, "loss": 1.0})
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 11, "loss": 1.0}]


def test_read_metrics_skips_a_torn_last_line_but_not_a_damaged_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(path)


def test_smooth_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0
    smoothed = smooth([1.0, 0.0] * 20, span=9)
    assert all(0.3 < v < 0.7 for v in smoothed[10:])


def check_png(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 1_000_000
    height, width = imread(path).shape[:2]
    assert (width, height) == (960, 540)  # 8 x 4.5 inches at 120 dpi


def test_plot_losses_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_run(metrics, range(1, 101), eval_every=20)
    png = tmp_path / "plots" / "loss.png"
    plot_losses(metrics, png, title="tiny run")
    check_png(png)
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss.png"]


@pytest.mark.parametrize("records", [
    [{"step": 1, "loss": 2.0}],  # one point
    [{"step": s, "loss": 1 / s} for s in range(1, 30)],  # train only
    [{"step": 5, "eval_loss": 1.0}],  # validation only
    [{"step": 1, "loss": math.nan}, {"step": 2, "loss": 1.0}, {"note": "no step"}],
    [],  # nothing yet
])
def test_plot_losses_handles_sparse_logs(tmp_path, records):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_losses(metrics, tmp_path / "loss.png")
    check_png(tmp_path / "loss.png")
