"""Build data/e2e-dpo/base-{train,validation}.jsonl: preference pairs whose non-preferred answer is
the base model's own.

    .venv/bin/python scripts/make_e2e_dpo_base_answers.py      # about 10 minutes on 2 CPU cores

For each E2E meaning representation (MR) the pair puts side by side
- preferred: a human reference for that MR (the first one in data/e2e/), and
- non-preferred: what SmolLM2-135M-Instruct, the embedded base model, answers to the same prompt
  (greedy, at most 64 new tokens: feathertune's evaluation settings, BLEU 13.7 on validation).
This is the usual shape of preference data (a reference, or a better model's answer, against the
policy's own sample), and the hard case for a model: greedy answers are the base's most likely
ones, so before tuning it rates its own answer higher on nearly every pair. One pair per MR:
487 for training from data/e2e/train.jsonl, 60 for validation from data/e2e/validation.jsonl.

Greedy decoding on the CPU in float32 makes the files reproducible on one machine; other CPUs may
round a near-tie the other way and change a few answers.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
E2E_DIR = ROOT / "data" / "e2e"
OUT_DIR = ROOT / "data" / "e2e-dpo"
MAX_NEW_TOKENS = 64


def first_reference_per_mr(path: Path) -> list[tuple[str, str]]:
    """(prompt, first human reference) for each MR of an E2E file, in file order."""
    seen: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "messages" in record:  # train.jsonl: one chat line per reference
            prompt, reference = record["messages"][0]["content"], record["messages"][1]["content"]
        else:  # validation.jsonl: one line per MR with all its references
            prompt, reference = record["prompt"], record["references"][0]
        seen.setdefault(prompt, reference)
    return list(seen.items())


def preference_line(prompt: str, preferred: str, non_preferred: str) -> str:
    return json.dumps({"input": {"messages": [{"role": "user", "content": prompt}]},
                       "preferred_output": [{"role": "assistant", "content": preferred}],
                       "non_preferred_output": [{"role": "assistant", "content": non_preferred}]},
                      ensure_ascii=False)


def main() -> None:
    import torch

    from feathertune.evaluate import generate
    from feathertune.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct")
    for split, source in (("validation", "validation.jsonl"), ("train", "train.jsonl")):
        pairs = first_reference_per_mr(E2E_DIR / source)
        answers = generate(model, tokenizer, [[{"role": "user", "content": p}] for p, _ in pairs],
                           max_new_tokens=MAX_NEW_TOKENS, batch_size=20, desc=f"base answers ({split})")
        lines = [preference_line(p, ref, answer) for (p, ref), answer in zip(pairs, answers)
                 if answer.strip() and answer.strip() != ref.strip()]
        out = OUT_DIR / f"base-{split}.jsonl"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{out.relative_to(ROOT)}: {len(lines)} pairs of {len(pairs)} MRs")


if __name__ == "__main__":
    main()
