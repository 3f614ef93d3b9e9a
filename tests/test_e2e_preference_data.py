"""data/e2e-dpo/: every pair is well formed, the preferred answer is an E2E human reference as
written, the non-preferred one is that reference with exactly one MR value swapped for another
value of the same attribute, no validation MR is in train, and the script rebuilds both files byte
for byte.

The one-swap check is written here independently of scripts/make_e2e_preference.py: it reads the MR
and the attribute values from data/e2e/ itself and looks for a swap that explains the difference.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "data" / "e2e"
DPO = REPO / "data" / "e2e-dpo"
SPLITS = ["train", "validation"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mr_of(prompt: str) -> dict[str, str]:
    return {key.strip(): value for key, value in re.findall(r"([^,:\[\]]+)\[([^\]]*)\]", prompt)}


def e2e_references() -> dict[str, set[str]]:
    """{prompt: its human references} over both E2E files."""
    references: dict[str, set[str]] = {}
    for row in read_jsonl(E2E / "train.jsonl"):
        user, assistant = row["messages"]
        references.setdefault(user["content"], set()).add(assistant["content"])
    for row in read_jsonl(E2E / "validation.jsonl"):
        references.setdefault(row["prompt"], set()).update(row["references"])
    return references


def swap_explains(preferred: str, non_preferred: str, mr: dict[str, str], values: dict[str, set[str]]) -> bool:
    """Whether non_preferred is preferred with one MR value replaced by another value of its attribute
    (compared in lower case, with "an" read as "a" since the article follows the new word)."""
    def norm(text: str) -> str:
        return re.sub(r"\ban\b", "a", text.lower())

    for attribute, value in mr.items():
        pattern = re.compile(r"(?<!\w)" + re.escape(value) + r"(?!\w)", re.IGNORECASE)
        if not pattern.search(preferred):
            continue
        for wrong in values[attribute] - {value}:
            if norm(pattern.sub(lambda _: wrong, preferred)) == norm(non_preferred):
                return True
    return False


@pytest.fixture(scope="module")
def pairs() -> dict[str, list[dict]]:
    return {split: read_jsonl(DPO / f"{split}.jsonl") for split in SPLITS}


def test_pairs_are_well_formed(pairs):
    for split, rows in pairs.items():
        assert rows, f"{split}.jsonl is empty"
        for n, row in enumerate(rows, 1):
            where = f"{split}.jsonl line {n}"
            assert set(row) == {"input", "preferred_output", "non_preferred_output"}, where
            assert set(row["input"]) == {"messages"}, where
            for key, role in [("messages", "user"), ("preferred_output", "assistant"),
                              ("non_preferred_output", "assistant")]:
                turns = row["input"]["messages"] if key == "messages" else row[key]
                assert len(turns) == 1 and turns[0]["role"] == role, (where, turns)
                assert isinstance(turns[0]["content"], str) and turns[0]["content"].strip(), where
            assert row["preferred_output"][0]["content"] != row["non_preferred_output"][0]["content"], where


def test_preferred_is_a_human_reference_and_non_preferred_swaps_one_value(pairs):
    references = e2e_references()
    values: dict[str, set[str]] = {}
    for prompt in references:
        for attribute, value in mr_of(prompt).items():
            values.setdefault(attribute, set()).add(value)
    for split, rows in pairs.items():
        for n, row in enumerate(rows, 1):
            prompt = row["input"]["messages"][0]["content"]
            preferred = row["preferred_output"][0]["content"]
            non_preferred = row["non_preferred_output"][0]["content"]
            assert preferred in references.get(prompt, ()), f"{split}.jsonl line {n}: not an E2E reference"
            assert swap_explains(preferred, non_preferred, mr_of(prompt), values), (
                f"{split}.jsonl line {n}: no single swap of an MR value turns\n{preferred!r}\ninto\n{non_preferred!r}")


def test_at_most_two_pairs_per_mr_from_different_references(pairs):
    for split, rows in pairs.items():
        per_prompt = Counter(row["input"]["messages"][0]["content"] for row in rows)
        assert max(per_prompt.values()) <= 2, split
        distinct = {(row["input"]["messages"][0]["content"], row["preferred_output"][0]["content"]) for row in rows}
        assert len(distinct) == len(rows), f"{split}: a reference is used twice for one MR"


def test_no_validation_mr_in_train(pairs):
    train = {row["input"]["messages"][0]["content"] for row in pairs["train"]}
    validation = {row["input"]["messages"][0]["content"] for row in pairs["validation"]}
    assert not train & validation, sorted(train & validation)[:3]


def test_script_rebuilds_the_files_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_e2e_preference", REPO / "scripts" / "make_e2e_preference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build(E2E, tmp_path)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DPO / f"{split}.jsonl").read_bytes(), (
            f"{split}.jsonl differs from a rebuild: rerun `python scripts/make_e2e_preference.py`")
