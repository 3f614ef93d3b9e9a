"""Build data/e2e-dpo/: preference pairs for DPO, made from the E2E NLG data in data/e2e/.

    python scripts/make_e2e_preference.py

Each pair keeps the E2E prompt (a meaning representation, MR) and puts side by side
- preferred: one human reference for that MR, unchanged, and
- non-preferred: the same reference with exactly one MR value swapped for a wrong value of the same
  attribute seen elsewhere in E2E (food[Chinese] -> "English", customer rating[5 out of 5] ->
  "1 out of 5", name[Cotto] -> "Clowns", ...), every occurrence of it, and "a"/"an" before it
  agreeing with the new word.
So the two answers differ in one fact and in nothing else: no length, style or fluency cue tells
them apart, only faithfulness to the MR.

A value is swapped only where the swap is unambiguous and stays grammatical:
- it occurs verbatim (case-insensitive, whole words) in the reference; familyFriendly[yes/no] never
  does, and eatType has one value in this data, so neither is ever swapped;
- no other value of the MR contains it or is it (priceRange[high] and customer rating[high] would be
  the same "high");
- a word-form price or rating ("cheap", "high", "average") is followed within two words by a word
  of its own attribute ("price", "rating", "customer", ...), so "high" means what the MR says, and
  "a cheap coffee shop" never becomes "a high coffee shop";
- the wrong value has the same form (words for words, figures for figures: "low" -> "high",
  "less than £20" -> "more than £30") and is no value of the MR and not already in the text;
- the swap makes none of the few AWKWARD phrases no writer would ("near the The Mill",
  "on the city centre", "cheap priced").

train.jsonl: from data/e2e/train.jsonl, at most 2 pairs per MR from different references, lines
shuffled. validation.jsonl: from data/e2e/validation.jsonl, 2 pairs per MR where two references
qualify. Every choice is drawn from a random.Random seeded here, so a rerun rewrites both files byte
for byte (tests/test_e2e_preference_data.py checks it).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
E2E_DIR = ROOT / "data" / "e2e"
OUT_DIR = ROOT / "data" / "e2e-dpo"

PROMPT_PREFIX = "Write a one-sentence description of the restaurant from this meaning representation: "
PAIRS_PER_MR = 2
TRAIN_SEED, VALIDATION_SEED = 2017, 2018  # one generator per split: changing one leaves the other as is

# Words that say which attribute a bare "high"/"low"/"average"/"cheap"/"moderate" describes.
CUES = {
    "priceRange": re.compile(r"(price|priced|prices|pricing|cost|costs)\b"),
    "customer rating": re.compile(r"(rated|rating|ratings|customer|customers|review|reviews|stars?)\b"),
}
CUE_WINDOW = 2  # words after the value: "a high price", "an average customer rating"
NEVER_SWAPPED = {"familyFriendly"}  # yes/no never appears verbatim in a reference
# Phrases a swap can make that no writer would ("near the Wildwood" -> "near the The Mill"), which
# would let a model tell the pair apart by fluency instead of by the facts.
AWKWARD = re.compile(r"\b(the the|(on|by|along) the city centre|cheap priced|between (less|more) than"
                     r"|(above|below) (low|high))\b", re.IGNORECASE)


class Corruption(NamedTuple):
    attribute: str
    value: str  # the MR's value, as in the MR
    wrong: str  # the value put in its place, as in the other MRs
    text: str  # the reference with the swap made


def mr_from_prompt(prompt: str) -> str:
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f"prompt {prompt[:80]!r}... does not start with the E2E prefix {PROMPT_PREFIX!r}")
    return prompt[len(PROMPT_PREFIX):]


def parse_mr(mr: str) -> dict[str, str]:
    """`name[Cotto], food[Chinese], ...` -> {"name": "Cotto", "food": "Chinese", ...}.

    Raises:
        ValueError: if the MR does not read back exactly from what was parsed (a stray bracket or comma).
    """
    items = re.findall(r"\s*([^,\[\]]+?)\[([^\]]*)\]", mr)
    attributes = dict(items)
    if ", ".join(f"{k}[{v}]" for k, v in items) != mr or len(attributes) != len(items):
        raise ValueError(f"cannot parse MR {mr!r}; expected attribute[value] items joined by ', '")
    return attributes


def attribute_values(mrs: list[dict[str, str]]) -> dict[str, list[str]]:
    """Every value each attribute takes in `mrs`, sorted so that seeded choices do not depend on hashing."""
    seen: dict[str, set[str]] = {}
    for mr in mrs:
        for attribute, value in mr.items():
            seen.setdefault(attribute, set()).add(value)
    return {attribute: sorted(values) for attribute, values in sorted(seen.items())}


def value_pattern(value: str) -> re.Pattern:
    # A hyphen counts as part of a word, so "high" is not found in "high-end" ("cheap-end" reads badly).
    return re.compile(r"(?<![\w-])" + re.escape(value) + r"(?![\w-])", re.IGNORECASE)


def _first_cue(text: str) -> str | None:
    """The attribute named first within CUE_WINDOW words of `text` (which starts right after a value)."""
    for word in text.split()[:CUE_WINDOW]:
        for attribute, cue in CUES.items():
            if cue.match(word.lower()):
                return attribute
    return None


def is_swappable(reference: str, attribute: str, mr: dict[str, str]) -> bool:
    """Whether every occurrence of the MR's `attribute` value in `reference` can be swapped unambiguously."""
    value = mr[attribute]
    matches = list(value_pattern(value).finditer(reference))
    if attribute in NEVER_SWAPPED or not matches:
        return False
    # "highly rated", "high-priced", "Cottos" say the value too but cannot be swapped cleanly, and
    # swapping the other occurrences would leave the right value beside the wrong one.
    if len(re.findall(r"(?<![a-z])" + re.escape(value), reference, re.IGNORECASE)) != len(matches):
        return False
    if any(value_pattern(value).search(other) or value_pattern(other).search(value)
           for key, other in mr.items() if key != attribute):
        return False
    if attribute in CUES and not re.search(r"\d", value):
        return all(_first_cue(reference[m.end():]) == attribute for m in matches)
    return True


def wrong_values(reference: str, attribute: str, mr: dict[str, str], values: dict[str, list[str]]) -> list[str]:
    """Values of `attribute` that may replace the MR's: same form, not in the MR, not already in the
    text, and not making an AWKWARD phrase."""
    value = mr[attribute]
    in_mr = {v.lower() for v in mr.values()}
    has_digit = bool(re.search(r"\d", value))
    awkward = len(AWKWARD.findall(reference))
    return [w for w in values.get(attribute, [])
            if w.lower() not in in_mr and bool(re.search(r"\d", w)) == has_digit
            and not value_pattern(w).search(reference)
            and len(AWKWARD.findall(swap_value(reference, value, w))) == awkward]


def _match_case(wrong: str, occurrence: str) -> str:
    if occurrence.islower():  # "chinese food" -> "english food": keep the writer's lower case
        return wrong.lower()
    if occurrence[0].isupper():  # sentence start, "City centre" -> "Riverside"
        return wrong[0].upper() + wrong[1:]
    return wrong


def swap_value(reference: str, value: str, wrong: str) -> str:
    """`reference` with every whole-word `value` replaced by `wrong`, and a/an before it fixed."""
    article = re.compile(r"(?<!\w)(an?) $", re.IGNORECASE)
    parts, end = [], 0
    for m in value_pattern(value).finditer(reference):
        before = reference[end:m.start()]
        new = _match_case(wrong, m.group())
        if a := article.search(before):
            fixed = "an" if new[0].lower() in "aeiou" else "a"
            fixed = fixed.capitalize() if a.group(1)[0].isupper() else fixed
            before = before[:a.start(1)] + fixed + " "
        parts += [before, new]
        end = m.end()
    return "".join(parts) + reference[end:]


def corrupt(reference: str, mr: dict[str, str], values: dict[str, list[str]],
            rng: random.Random) -> Corruption | None:
    """One MR value in `reference` swapped for a wrong one (attribute and value drawn from `rng`),
    or None if no value of the MR can be swapped in it."""
    candidates = [a for a in mr if is_swappable(reference, a, mr) and wrong_values(reference, a, mr, values)]
    if not candidates:
        return None
    attribute = rng.choice(candidates)
    wrong = rng.choice(wrong_values(reference, attribute, mr, values))
    text = swap_value(reference, mr[attribute], wrong)
    assert text != reference, (reference, attribute, wrong)
    return Corruption(attribute, mr[attribute], wrong, text)


def preference_record(prompt: str, preferred: str, non_preferred: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


def read_train_groups(path: Path) -> dict[str, list[str]]:
    """data/e2e/train.jsonl as {prompt: [its distinct references, in file order]}."""
    groups: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        user, assistant = json.loads(line)["messages"]
        references = groups.setdefault(user["content"], [])
        if assistant["content"] not in references:
            references.append(assistant["content"])
    return groups


def read_validation_groups(path: Path) -> dict[str, list[str]]:
    """data/e2e/validation.jsonl as {prompt: [its distinct references, in file order]}."""
    groups = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if mr_from_prompt(row["prompt"]) != row["mr"]:
            raise ValueError(f"{path}: prompt and mr disagree for {row['mr']!r}")
        groups[row["prompt"]] = list(dict.fromkeys(row["references"]))
    return groups


def make_pairs(groups: dict[str, list[str]], values: dict[str, list[str]], rng: random.Random,
               swapped: Counter) -> list[dict]:
    """Up to PAIRS_PER_MR records per MR, from different references tried in a seeded order;
    counts each swapped attribute in `swapped`."""
    records = []
    for prompt, references in groups.items():
        mr = parse_mr(mr_from_prompt(prompt))
        taken = 0
        for reference in rng.sample(references, len(references)):
            if taken == PAIRS_PER_MR:
                break
            if corruption := corrupt(reference, mr, values, rng):
                records.append(preference_record(prompt, reference, corruption.text))
                swapped[corruption.attribute] += 1
                taken += 1
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(e2e_dir: Path = E2E_DIR, out_dir: Path = OUT_DIR) -> dict[str, Counter]:
    """Write out_dir/train.jsonl and out_dir/validation.jsonl; return each split's swapped-attribute counts."""
    train = read_train_groups(e2e_dir / "train.jsonl")
    validation = read_validation_groups(e2e_dir / "validation.jsonl")
    # Wrong values come from every MR in E2E (validation's values all occur in train as well).
    values = attribute_values([parse_mr(mr_from_prompt(p)) for p in [*train, *validation]])
    swapped = {"train": Counter(), "validation": Counter()}

    train_rng = random.Random(TRAIN_SEED)
    train_records = make_pairs(train, values, train_rng, swapped["train"])
    train_rng.shuffle(train_records)  # E2E lists an MR's references together; mix them
    write_jsonl(out_dir / "train.jsonl", train_records)

    validation_records = make_pairs(validation, values, random.Random(VALIDATION_SEED), swapped["validation"])
    write_jsonl(out_dir / "validation.jsonl", validation_records)
    return swapped


def main() -> None:
    swapped = build()
    for split, counts in swapped.items():
        print(f"{OUT_DIR.relative_to(ROOT)}/{split}.jsonl: {sum(counts.values())} pairs; swapped attribute: "
              + ", ".join(f"{attribute} {n}" for attribute, n in counts.most_common()))


if __name__ == "__main__":
    main()
