"""Batches: which examples go together (`batch_indices`) and how they become tensors (`collate`).

Grouping by length keeps padding small — on CPU, padding is most of the wasted time — while the
batch order stays random, so that the loss curve does not follow sequence length. Everything is a
function of (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import torch

from feathertune.errors import ConfigError

IGNORE_INDEX = -100  # labels of padding carry no loss
GROUP_CHUNK = 50  # group_by_length sorts windows of this many batches, so order stays random between windows


def batch_indices(lengths: list[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  group_by_length: bool = True) -> list[list[int]]:
    """Split example indices into batches; every index appears exactly once, the last batch may be short.

    With shuffle: a random permutation seeded by (seed, epoch). With group_by_length as well, each
    window of 50 × batch_size shuffled indices is sorted by length (longest first) and cut into
    batches, and the batch order is then shuffled, so batches hold similar lengths in random order.
    Without shuffle: indices in order (group_by_length is ignored), as evaluation wants.

    Raises:
        ConfigError: batch_size is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError([f"batch_size={batch_size!r} must be a positive integer"], source="batch_indices")
    n = len(lengths)
    if not shuffle:
        return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    if not group_by_length:
        return [order[start:start + batch_size] for start in range(0, n, batch_size)]
    window = GROUP_CHUNK * batch_size
    batches = []
    for start in range(0, n, window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows from `tokenize_examples` on the right into one batch.

    Returns input_ids (B, T) padded with pad_id, attention_mask (B, T) with 1 on real tokens, and
    labels: (B, T) padded with -100 (chat, text), or (B,) class ids (classification) — the key
    Hugging Face models take for both. Preference pairs give 2B rows, the B preferred answers first
    and then the B others in the same order, so that both go through the model in one forward.
    """
    if not rows:
        raise ValueError("collate() got no rows; batches must hold at least one example")
    if "rejected_input_ids" in rows[0]:
        rejected = [{"input_ids": row["rejected_input_ids"], "labels": row["rejected_labels"]} for row in rows]
        return collate([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows] + rejected, pad_id)
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in rows[0]:
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            labels[b, : len(row["labels"])] = torch.tensor(row["labels"], dtype=torch.long)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)  # (B,)
    return batch


def _mix(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch) pair, distinct for all 32-bit values of each."""
    return ((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF)
