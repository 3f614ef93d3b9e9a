"""Behaviour around the core contract: tied heads, PiSSA export, atomic files, resumed training."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import feathertune as ft
from feathertune import checkpoint
from models import inputs_for, output_of, tiny_gpt2, tiny_llama


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_merging_a_tied_output_head_keeps_the_embeddings_and_survives_save_pretrained(tmp_path):
    """GPT-2's lm_head shares wte's weight: merging LoRA into the head must not touch the input side."""
    base = tiny_gpt2()
    inputs = inputs_for("gpt2")
    model = ft.attach(copy.deepcopy(base), ft.LoraConfig(r=4, dropout=0.0, target_modules=["c_attn", "lm_head"]))
    _perturb(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    with pytest.warns(UserWarning, match="tied embeddings"):
        merged = ft.merge(model)
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
    with torch.no_grad():
        assert (output_of(merged, inputs) - expected).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path)
    reloaded = type(base).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (output_of(reloaded, inputs) - expected).abs().max() <= 1e-5


def test_pissa_starts_at_the_base_and_exports_a_plain_lora_that_peft_and_feathertune_load(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    inputs = inputs_for("llama")
    model = ft.attach(copy.deepcopy(base), ft.LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa",
                                                         target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        assert (output_of(model, inputs) - output_of(base, inputs)).abs().max() <= 1e-5
    _perturb(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    ft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = ft.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert (output_of(theirs, inputs) - expected).abs().max() <= 1e-5
        assert (output_of(ours, inputs) - expected).abs().max() <= 1e-5


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model = ft.attach(tiny_llama(), ft.LoraConfig(r=4, target_modules=["q_proj"]))
    ft.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _perturb(model)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ft.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either


def test_load_adapter_trainable_continues_training(tmp_path):
    base = tiny_llama()
    model = ft.attach(copy.deepcopy(base), ft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    ft.save_adapter(model, tmp_path)
    frozen = ft.load_adapter(copy.deepcopy(base), tmp_path)
    assert ft.trainable_parameters(frozen)[0] == 0
    resumed = ft.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    assert ft.trainable_parameters(resumed)[0] == ft.trainable_parameters(model)[0]
    params = [p for p in resumed.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    output_of(resumed.train(), inputs_for("llama")).pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_quickstart_example_runs(capsys):
    import runpy
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "quickstart.py"
    with pytest.warns(UserWarning, match="tied"):
        runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < 0.5 * losses[0], out


def test_checkpoint_tensors_restore_a_pissa_adapter_exactly():
    """Resuming puts [A; A0], [B, -B0] back where they came from, frozen PiSSA factors included."""
    from feathertune.checkpoint import adapter_file_tensors, restore_tensors

    config = ft.LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa", use_rslora=True,
                           target_modules=["q_proj", "down_proj"])
    model = ft.attach(tiny_llama(), config)
    _perturb(model, seed=1)
    saved = {k: v.detach().clone() for k, v in adapter_file_tensors(model, "default").items()}
    other = ft.attach(tiny_llama(), config)
    _perturb(other, seed=2)
    restore_tensors(other, "default", saved, "test")
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ft.AdapterMismatchError, match="lacks"):
        restore_tensors(other, "default", dict(list(saved.items())[1:]), "test")
