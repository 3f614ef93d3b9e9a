"""The README's service example, run as it is written (only the port differs) against a live
server whose `smollm2-135m-instruct` is the tiny test model, from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from live import KEY, workspace_server

pytest.importorskip("openai")
REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- README example: tests/service/test_readme_example.py runs this block as it is -->"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(MARKER, 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_readme_example_is_ten_lines():
    assert len(readme_example().strip().splitlines()) <= 12


def test_the_readme_example_runs(tmp_path):
    with workspace_server(tmp_path, model_name="smollm2-135m-instruct") as server:
        code = readme_example().replace("http://127.0.0.1:8000/v1", server.url)
        assert code != readme_example()
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "FEATHERTUNE_API_KEY": KEY})
        assert done.returncode == 0, done.stderr[-3000:]
        model, _, answer = done.stdout.strip().partition(" ")
        assert model.startswith("ft:smollm2-135m-instruct:e2e:ftjob-"), done.stdout
