"""Mixed-batch inference: `model(..., adapter_names=[...])` runs one adapter per row of the batch.

Each row must come out exactly as if it had been run alone with only its adapter active
(`ft.set_active(model, [name])`), or with `ft.disabled(model)` for "__base__". Checked on a tiny
Llama (LoRA + DoRA adapters) and a tiny BERT classifier whose head is a `modules_to_save` module,
so that each adapter also has its own copy of the classifier. float32, eval mode, dropout 0.
"""

from __future__ import annotations

import pytest
import torch

import feathertune as ft
from feathertune.adapters import active_adapters
from feathertune.saved_modules import ModulesToSave
from feathertune.wrapping import BASE, wrapped_layers
from models import VOCAB, randomise, tiny_bert, tiny_llama

pytest.importorskip("transformers")

ATOL = 1e-5
ADAPTERS = {"a": False, "b": False, "c": True}  # name -> use_dora


def build(kind: str) -> torch.nn.Module:
    if kind == "llama":
        model = tiny_llama(seed=0)
        extra = {}
    else:
        model = tiny_bert(seed=0)
        extra = {"modules_to_save": ["classifier"]}
    for name, dora in ADAPTERS.items():
        ft.attach(model, ft.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                                       use_dora=dora, **extra), name=name)
    randomise(model)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "bert"])
def model(request):
    model = build(request.param)
    ft.set_active(model, ["a"])
    yield model


def ids_for(batch: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, 9), generator=g)


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits


@torch.no_grad()
def alone(model, row: torch.Tensor, name: str) -> torch.Tensor:
    """One row run on its own with only `name` active (or the base model for "__base__")."""
    if name == BASE:
        with ft.disabled(model):
            return logits(model, row)
    ft.set_active(model, [name])
    return logits(model, row)


def test_setup_is_meaningful(model):
    """The adapters must really differ from each other and from the base, or the test proves nothing."""
    assert {n for _, layer in wrapped_layers(model) for n in layer.adapter_names()} == set(ADAPTERS)
    if isinstance(getattr(model, "classifier", None), torch.nn.Module):
        assert isinstance(model.classifier, ModulesToSave)
        assert set(model.classifier.copies) == set(ADAPTERS)
    ids = ids_for(1)
    outs = {n: alone(model, ids, n) for n in [*ADAPTERS, BASE]}
    names = list(outs)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert (outs[x] - outs[y]).abs().max() > 1e-3, (x, y)


@pytest.mark.parametrize("names", [
    ["a", BASE, "c", "b"],
    ["c", "a", "c", BASE, "b", "a", BASE],  # repeated names, rows of one adapter not contiguous
    ["b", "b", "b"],
    [BASE, BASE],
], ids=["one-each", "repeats", "all-one", "all-base"])
def test_each_row_matches_running_it_alone(model, names):
    ft.set_active(model, ["a"])
    ids = ids_for(len(names))
    mixed = logits(model, ids, adapter_names=names)
    assert mixed.shape[0] == len(names)
    for i, name in enumerate(names):
        want = alone(model, ids[i:i + 1], name)
        diff = (mixed[i:i + 1] - want).abs().max().item()
        assert diff <= ATOL, f"row {i} ({name!r}) differs by {diff:.2e}"


def test_unknown_adapter_name_is_a_config_error(model):
    ids = ids_for(3)
    with pytest.raises(ft.ConfigError, match="nope") as info:
        logits(model, ids, adapter_names=["a", "nope", BASE])
    assert "adapter_names" in str(info.value)


@pytest.mark.parametrize("count", [2, 5])
def test_wrong_number_of_names_is_a_config_error(model, count):
    ids = ids_for(4)
    with pytest.raises(ft.ConfigError) as info:
        logits(model, ids, adapter_names=["a"] * count)
    message = str(info.value)
    assert str(count) in message and "4" in message, message


def test_mixed_batch_needs_unmerged_adapters(model):
    ft.set_active(model, ["b"])
    ids = ids_for(2)
    ft.merge(model, unload=False)
    try:
        with pytest.raises(ft.ConfigError, match="unmerge"):
            logits(model, ids, adapter_names=["a", BASE])
    finally:
        ft.unmerge(model)


def test_plain_forward_after_mixed_batch_uses_active_adapters(model):
    ids = ids_for(4)
    ft.set_active(model, ["b", "c"])
    expected = logits(model, ids)
    with ft.disabled(model):
        base = logits(model, ids)
    assert (expected - base).abs().max() > 1e-3

    logits(model, ids, adapter_names=["a", BASE, "c", "b"])
    assert active_adapters(model) == ["b", "c"]
    assert all(layer.active == ["b", "c"] for _, layer in wrapped_layers(model))
    assert (logits(model, ids) - expected).abs().max() <= ATOL

    # A mixed call that fails also leaves nothing behind, even right after a successful one.
    logits(model, ids, adapter_names=[BASE, BASE, "a", "a"])
    with pytest.raises(ft.ConfigError):
        logits(model, ids, adapter_names=["a", "zzz", BASE, "b"])
    assert (logits(model, ids) - expected).abs().max() <= ATOL
    logits(model, ids, adapter_names=["c", "c", "c", "c"])
    with pytest.raises(ft.ConfigError):
        logits(model, ids, adapter_names=["a"])
    assert (logits(model, ids) - expected).abs().max() <= ATOL
    with ft.disabled(model):
        assert (logits(model, ids) - base).abs().max() <= ATOL
