"""Partial and full fine-tuning and BitFit: what each option chooses, the counts, the file, the errors.

The contract matrix (test_contract.py) checks the promises every method keeps; this file checks
which tensors each option trains, against counts written out from the tiny models' shapes.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import logits_of, random_ids, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import feathertune as ft
from feathertune.adapters import adapter_parameters
from feathertune.methods.partial import PartialLayer


def trained_names(model) -> set[str]:
    """'<module path>.<tensor>' of every tensor adapter 'default' trains (paths as in the base)."""
    return {f"{path}.{key}" for path, site in model.named_modules() if isinstance(site, PartialLayer)
            and "default" in site.tuned for key in site.tuned["default"]}


def numel(model, names) -> int:
    return sum(model.get_parameter(n).numel() for n in names)


def test_top_blocks_trains_the_top_blocks_and_the_final_norm():
    base = tiny_llama()  # 2 blocks, untied head
    expected = {n for n, _ in base.named_parameters() if n.startswith("model.layers.1.")}
    expected |= {"model.norm.weight", "lm_head.weight"}
    count = numel(base, expected)
    model = ft.attach(base, ft.PartialConfig(top_blocks=1))
    assert trained_names(model) == expected
    assert ft.trainable_parameters(model)[0] == count


def test_top_blocks_leaves_a_head_tied_to_the_embeddings_frozen():
    base = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    assert base.lm_head.weight is base.transformer.wte.weight
    model = ft.attach(base, ft.PartialConfig(top_blocks=1))
    names = trained_names(model)
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= names
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f.")) for n in names), names


def test_named_modules_train_every_tensor_below_them():
    base = tiny_llama()
    expected = {n for n, _ in base.named_parameters() if ".mlp." in n}
    count = numel(base, expected)
    model = ft.attach(base, ft.PartialConfig(modules=["mlp"]))
    assert trained_names(model) == expected
    assert ft.trainable_parameters(model)[0] == count
    regex = ft.attach(tiny_llama(), ft.PartialConfig(modules=r".*\.1\.mlp\.up_proj"))
    assert trained_names(regex) == {"model.layers.1.mlp.up_proj.weight"}


def test_bitfit_trains_exactly_the_biases():
    base = tiny_bert()
    biases = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    count = numel(base, biases)
    model = ft.attach(base, ft.PartialConfig(bias_only=True))
    assert trained_names(model) == biases
    assert ft.trainable_parameters(model)[0] == count


def test_bitfit_on_a_bias_free_model_adds_zero_biases_to_its_linears_but_the_head():
    base = tiny_llama()
    ids = random_ids()
    before = logits_of(base, ids)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    model = ft.attach(base, ft.PartialConfig(bias_only=True))
    assert trained_names(model) == {f"{n}.bias" for n in linears}
    assert ft.trainable_parameters(model)[0] == sum(m.out_features for m in linears.values())
    assert torch.equal(logits_of(model, ids), before)  # zero biases: exactly the base


def test_full_trains_every_tensor_once_and_keeps_ties():
    base = tiny_gpt2()
    total = sum(p.numel() for p in base.parameters())
    model = ft.attach(base, ft.PartialConfig(modules="all"))
    assert ft.trainable_parameters(model) == (total, 2 * total)  # the frozen base stays beside the copy
    head, embeddings = model.lm_head.tuned["default"]["weight"], model.transformer.wte.tuned["default"]["weight"]
    assert head is embeddings, "tied tensors share one trainable copy"
    assert len({id(p) for p in adapter_parameters(model, "default")}) == len(adapter_parameters(model, "default"))


def test_the_file_holds_only_the_chosen_tensors_and_a_tie_once(tmp_path):
    model = ft.attach(tiny_gpt2(), ft.PartialConfig(modules=["ln_f", "lm_head"]))
    ft.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    # lm_head.weight is the embeddings' tensor: written once, under the first module that holds it.
    assert set(tensors) == {"base_model.model.transformer.wte.weight", "base_model.model.transformer.ln_f.weight",
                            "base_model.model.transformer.ln_f.bias"}
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["peft_type"] == "PARTIAL" and written["modules"] == ["ln_f", "lm_head"]
    with torch.no_grad():
        model.lm_head.tuned["default"]["weight"].add_(0.5)
    ft.save_adapter(model, tmp_path / "b")
    fresh = ft.load_adapter(tiny_gpt2(), tmp_path / "b")
    assert fresh.lm_head.tuned["default"]["weight"] is fresh.transformer.wte.tuned["default"]["weight"]
    ids = random_ids()
    assert torch.equal(logits_of(fresh, ids), logits_of(model, ids))


def test_two_fine_tunes_add_their_changes():
    """Active together, two partial fine-tunes give θ + (θa − θ) + (θb − θ) on a shared tensor."""
    model = ft.attach(tiny_llama(), ft.PartialConfig(modules=["lm_head"]), name="a")
    ft.attach(model, ft.PartialConfig(modules=["lm_head"]), name="b")
    site = model.lm_head
    with torch.no_grad():
        site.tuned["a"]["weight"].add_(0.1)
        site.tuned["b"]["weight"].mul_(1.5)
    ft.set_active(model, ["a", "b"])
    x = torch.randn(2, 3, site.base.in_features)
    expected = x @ (site.tuned["a"]["weight"] + site.tuned["b"]["weight"] - site.base.weight).T
    assert torch.allclose(site(x), expected, atol=1e-6)


def test_errors_say_what_to_change(tmp_path):
    with pytest.raises(ft.ConfigError, match="chooses nothing to train"):
        ft.PartialConfig()
    with pytest.raises(ft.ConfigError, match="top_blocks=0 must be a positive integer"):
        ft.PartialConfig(top_blocks=0)
    with pytest.raises(ft.TargetError, match=r"more blocks than the model has \(2: model.layers.0 … model.layers.1\)"):
        ft.attach(tiny_llama(), ft.PartialConfig(top_blocks=3))
    with pytest.raises(ft.TargetError, match="matched no module"):
        ft.attach(tiny_llama(), ft.PartialConfig(modules=["mpl"]))
    with pytest.raises(ft.ConfigError, match="bias_only='yes' must be true or false"):
        ft.PartialConfig(bias_only="yes")
    model = ft.attach(tiny_llama(), ft.PartialConfig(modules=["lm_head"]))
    ft.save_adapter(model, tmp_path / "a")
    with pytest.raises(ft.AdapterMismatchError, match="lm_head"):
        ft.load_adapter(tiny_gpt2(), tmp_path / "a")  # another architecture: GPT-2 has no such tensor shape


def test_quantized_tensors_are_refused_by_name():
    pytest.importorskip("bitsandbytes")
    model = ft.quantize(tiny_llama(), "nf4")
    with pytest.raises(ft.ConfigError, match="quantized"):
        ft.attach(model, ft.PartialConfig(top_blocks=1))
