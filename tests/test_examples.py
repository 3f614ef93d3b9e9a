"""The examples run as a user would run them, and say what their docstrings claim.

`examples/cnn_transfer.py` takes 15-20 s on two CPU cores, so it runs whole, in the default suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSFER_METHODS = ["head only (linear probe)", "late layers + head", "LoRA r=4 on every conv", "full fine-tuning"]
# Chance is 0.2. Seeds 0–3 measured 0.955–0.993 when the example was written; the bar leaves room for
# other CPUs and torch versions, and still fails a method that stopped learning.
ACCURACY_BAR = 0.9


def run_example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def table_rows(output: str) -> dict[str, tuple[int, float]]:
    """method -> (trainable parameters, test accuracy on digits 5–9), from the printed table."""
    rows = {}
    for line in output.splitlines():
        found = re.fullmatch(r"(.+?)\s+([\d,]+)\s+[\d.]+%\s+([\d.]+)\s+[\d.]+", line.strip())
        if found:
            rows[found[1]] = (int(found[2].replace(",", "")), float(found[3]))
    return rows


@pytest.fixture(scope="module")
def cnn_transfer_output() -> str:
    pytest.importorskip("sklearn", reason="examples/cnn_transfer.py needs scikit-learn (the test extra)")
    return run_example("cnn_transfer.py")


def test_cnn_transfer_lists_every_method_above_chance(cnn_transfer_output):
    rows = table_rows(cnn_transfer_output)
    assert list(rows) == TRANSFER_METHODS + ["from scratch (reference)"], cnn_transfer_output
    low = {method: acc for method, (_, acc) in rows.items() if acc < ACCURACY_BAR}
    assert not low, f"accuracy on digits 5-9 below {ACCURACY_BAR}: {low}\n{cnn_transfer_output}"
    pretrained = re.search(r"pretrained on digits 0-4 .*test accuracy ([\d.]+)", cnn_transfer_output)
    assert pretrained and float(pretrained[1]) >= 0.95, cnn_transfer_output


def test_cnn_transfer_trains_fewer_parameters_the_lighter_the_method(cnn_transfer_output):
    trainable = {method: count for method, (count, _) in table_rows(cnn_transfer_output).items()}
    probe, late, lora, full = (trainable[m] for m in TRANSFER_METHODS)
    assert probe < lora < late < full, trainable
    assert full == trainable["from scratch (reference)"], trainable  # full fine-tuning trains every weight


def test_cnn_transfer_leaves_the_base_untouched(cnn_transfer_output):
    drift = re.search(r"largest difference ([\d.e+-]+)\)", cnn_transfer_output)
    assert drift and float(drift[1]) == 0.0, cnn_transfer_output
