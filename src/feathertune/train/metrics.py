"""The training metrics log (metrics.jsonl) and its loss plot.

metrics.jsonl holds one JSON object per line, appended and flushed as training goes, so that a
killed run keeps everything up to its last write (and at worst one torn last line, which
`read_metrics` skips). Training records carry "step" and "loss" (DPO's also its rewards' accuracy and
margin, and both answers' log-probabilities); evaluation records carry "step" and "eval_loss".
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from feathertune.errors import ConfigError, DataError
from feathertune.files import write_atomic

Y_LABEL = "loss (cross-entropy per supervised token)"
DPO_Y_LABEL = "loss (DPO, per preference pair)"


def _json_default(value):
    """Let records hold tensors and numpy scalars/arrays, which json does not know: their .tolist()
    gives a plain number (0-d) or list."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"metrics record value {value!r} of type {type(value).__name__} is not JSON serializable")


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) for each line; a last line that does not parse is torn and skipped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    parsed, problems = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the run was killed mid-write: keep what came before
                break
            problems.append(f"{path}:{number}: not JSON ({e.msg}): {line[:60]!r}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:{number}: a {type(record).__name__}, not a JSON object")
            continue
        parsed.append((line, record))
    if problems:
        raise DataError(problems[:10], path=str(path), total=len(problems))
    return parsed


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, in order. A torn last line (a killed run) is skipped.

    Raises:
        FileNotFoundError: no such file.
        DataError: a line other than the last is not a JSON object (the file is damaged).
    """
    return [record for _, record in _parse_lines(Path(path))]


class MetricsLog:
    """Appends records to metrics.jsonl, one JSON object per line, flushed after each.

    A new run starts the file afresh. A resumed run (`resume_from_step=s`) first drops the records
    with step > s (written after the checkpoint it resumes from), rewriting the file atomically, so
    the log has no duplicated or orphaned steps. Records without a "step" are kept.

    Use as a context manager, or call close().
    """

    def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None and self.path.exists():
            kept = [line for line, record in _parse_lines(self.path)
                    if not isinstance(record.get("step"), (int, float)) or record["step"] <= resume_from_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Append one record (a dict of JSON-able values; tensors and numpy scalars are converted)."""
        if not isinstance(record, dict):
            raise ConfigError(f"a metrics record must be a dict, got {type(record).__name__}: {record!r}",
                              source="MetricsLog.write")
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finite_points(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a numeric `key` and "step"; NaN/inf are left out."""
    steps, values = [], []
    for record in records:
        step, value = record.get("step"), record.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(step)
            values.append(float(value))
    return steps, values


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average over about `span` points, debiased (as in Adam) so that the
    first points are not pulled toward zero."""
    beta = 1 - 2 / (span + 1)
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**t))
    return out


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Plot training loss (raw and smoothed) and validation loss against step, as a PNG.

    Uses matplotlib's Agg canvas directly, not pyplot, so it changes no global backend or state
    and works without a display. Works with any number of points, including none.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    train_steps, train_loss = _finite_points(records, "loss")
    eval_steps, eval_loss = _finite_points(records, "eval_loss")
    preference = any("reward_accuracy" in r for r in records)  # a DPO run: its rewards get a panel of their own

    figure = Figure(figsize=(8, 7.5 if preference else 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(2, 1, 1) if preference else figure.add_subplot()
    if train_loss:
        few = len(train_loss) < 3  # a line through one or two points is invisible without markers
        ax.plot(train_steps, train_loss, color="C0", linewidth=0.8, alpha=1 if few else 0.35,
                marker="o" if few else None, markersize=4, label="train (raw)")
        span = max(2, min(50, len(train_loss) // 20))  # a longer window lags the curve visibly
        if not few:
            ax.plot(train_steps, smooth(train_loss, span), color="C0", linewidth=2,
                    label=f"train (EMA, ~{span} points)")
    if eval_loss:
        ax.plot(eval_steps, eval_loss, color="C1", linewidth=1.5, marker="o", markersize=5,
                label="validation")
    if not train_loss and not eval_loss:
        ax.text(0.5, 0.5, f"no loss records yet in {Path(metrics_path).name}", ha="center",
                va="center", transform=ax.transAxes, color="gray")
    else:
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel(DPO_Y_LABEL if preference else Y_LABEL)
    ax.set_title(title or "Training and validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = set(train_steps + eval_steps)
    if len(steps) == 1:  # widen a single step, or the ticks read 0.99, 1.005, …
        ax.set_xlim(min(steps) - 1, min(steps) + 1)
    ax.grid(True, alpha=0.3)
    if preference:
        _plot_rewards(figure.add_subplot(2, 1, 2, sharex=ax), records)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(png_path, buffer.getvalue())


def _plot_rewards(ax, records: list[dict]) -> None:
    """DPO: the share of pairs whose preferred answer gets the higher implicit reward, and the mean
    reward margin (EMA-smoothed: single batches are noisy), against step."""
    steps, accuracy = _finite_points(records, "reward_accuracy")
    margin_steps, margin = _finite_points(records, "reward_margin")
    span = max(2, min(50, len(accuracy) // 20))
    ax.plot(steps, smooth(accuracy, span) if len(accuracy) > 2 else accuracy, color="C2", linewidth=2,
            marker="o" if len(accuracy) < 3 else None, label=f"reward accuracy (EMA, ~{span} points)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("reward accuracy")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    margins = ax.twinx()
    margins.plot(margin_steps, smooth(margin, span) if len(margin) > 2 else margin, color="C3", linewidth=1.5,
                 label="reward margin β·Δlog-ratio (EMA)")
    margins.set_ylabel("reward margin")
    lines = ax.get_lines() + margins.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")


def plot_interpolation(points: list[dict], png_path: str | os.PathLike, title: str = "") -> None:
    """WiSE-FT's curve: each score against α (0: the base, 1: the fine-tune), one panel per score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in ("loss", "accuracy", "bleu", "chrf", "exact_match")
            if any(isinstance(p.get(k), (int, float)) for p in points)]
    figure = Figure(figsize=(4 * max(1, len(keys)), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    for i, key in enumerate(keys):
        ax = figure.add_subplot(1, len(keys), i + 1)
        xs, ys = zip(*[(p["alpha"], p[key]) for p in points if isinstance(p.get(key), (int, float))])
        ax.plot(xs, ys, marker="o", color=f"C{i}")
        ax.set_xlabel("α  (0 = base, 1 = fine-tuned)")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    figure.suptitle(title or "WiSE-FT: (1 − α)·base + α·fine-tuned")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(png_path, buffer.getvalue())
