"""ft.combine: weighted combinations of LoRA adapters, checked against independent references.

- cat: the combined adapter's output is y_base + Σᵢ wᵢ·(yᵢ − y_base) at every adapted layer (the
  adapters' own forwards are the reference), and at the model output when only lm_head is adapted;
- svd: ‖ΔW − B·A‖_F equals √(Σ_{j>k} σⱼ²) of the target ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ (formed here from the
  adapters' tensors, its singular values from torch), and a large enough rank is exact;
- linear: the documented A, B formulas, written out here; exact when A or B is shared;
- refusals, each naming what was given; save → load in feathertune and in PEFT.
On Llama (nn.Linear, nn.Embedding), GPT-2 (HF Conv1D, transposed storage) and a small CNN (nn.Conv2d), float32,
dropout 0, B randomised (it starts at zero).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import feathertune as ft
from feathertune.adapters import adapter_parameters, adapter_state
from feathertune.methods.lora import LoraLayer
from feathertune.wrapping import wrapped_layers
from models import BUILDERS, inputs_for, output_of

WEIGHTS = {"a": 0.7, "b": -0.4}
_BASES: dict[str, nn.Module] = {}


def lora(r, alpha, targets, **settings) -> ft.LoraConfig:
    return ft.LoraConfig(r=r, alpha=alpha, dropout=0.0, target_modules=targets, **settings)


# Two adapters per model kind, with different ranks, scales (one rsLoRA) and overlapping target sets.
PAIRS = {
    "llama": {"a": lora(2, 4, ["embed_tokens", "q_proj", "v_proj"]),
              "b": lora(3, 6, ["v_proj", "o_proj", "down_proj"], use_rslora=True, rank_pattern={"down_proj": 1})},
    "gpt2": {"a": lora(2, 4, ["c_attn"]), "b": lora(3, 5, ["c_attn", "c_proj"], use_rslora=True)},
    "cnn": {"a": lora(2, 4, ["conv1", "conv2"]), "b": lora(1, 3, ["conv2", "head"])},
}
KINDS = list(PAIRS)


def fresh_base(kind: str) -> nn.Module:
    if kind not in _BASES:
        _BASES[kind] = BUILDERS[kind](seed=0)
    return copy.deepcopy(_BASES[kind]).eval()


@torch.no_grad()
def with_adapters(kind: str, configs: dict[str, ft.LoraConfig]) -> nn.Module:
    """A fresh base carrying these adapters, every tensor moved off its init by N(0, 0.3²) noise."""
    model = fresh_base(kind)
    for seed, (name, config) in enumerate(configs.items()):
        ft.attach(model, config, name=name)
        g = torch.Generator().manual_seed(seed)
        for p in adapter_parameters(model, name):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def combined_layers(model, name: str) -> dict[str, LoraLayer]:
    return {path: layer for path, layer in wrapped_layers(model) if isinstance(layer, LoraLayer) and name in layer.lora}


def layer_input(layer: LoraLayer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = layer.base
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=g)
    if isinstance(base, nn.Embedding):
        return torch.randint(0, base.num_embeddings, (2, 5), generator=g)
    return torch.randn(2, 5, layer.base_weight().shape[1], generator=g)


@torch.no_grad()
def assert_weighted_sum_per_layer(model, name: str, weights: dict[str, float]) -> None:
    """y_name − y_base = Σᵢ wᵢ·(yᵢ − y_base) at every layer adapter `name` sits on."""
    layers = combined_layers(model, name)
    assert layers
    for path, layer in layers.items():
        x = layer_input(layer)
        with ft.disabled(model):
            base = layer(x)
        outputs = {}
        for n in [name, *weights]:
            ft.set_active(model, n)
            outputs[n] = layer(x)
        expected = sum(w * (outputs[n] - base) for n, w in weights.items())
        assert (outputs[name] - base - expected).abs().max().item() <= 1e-5, path
    ft.set_active(model, name)


def target_delta(layer: LoraLayer, weights: dict[str, float]) -> torch.Tensor:
    """Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ in float64, flattened to (out, in·…), formed from the adapters' own tensors."""
    total = 0
    for n, w in weights.items():
        if n in layer.lora:
            adapter = layer.lora[n]
            total = total + w * adapter.scale * (adapter.B.double().flatten(1) @ adapter.A.double().flatten(1))
    return total


def combined_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    adapter = layer.lora[name]
    return adapter.scale * (adapter.B.double().flatten(1) @ adapter.A.double().flatten(1))


# --- cat ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_cat_output_is_the_weighted_sum_per_layer(kind):
    model = with_adapters(kind, PAIRS[kind])
    assert ft.combine(model, WEIGHTS, "ab", how="cat") is model
    assert adapter_state(model).active == ["ab"]
    assert not any(p.requires_grad for p in adapter_parameters(model, "ab")), "the combination is frozen"
    assert all(p.requires_grad for p in adapter_parameters(model, "a")), "the inputs keep their flags"
    for path, layer in combined_layers(model, "ab").items():
        assert layer.lora["ab"].rank == sum(layer.lora[n].rank for n in WEIGHTS if n in layer.lora), path
        assert layer.lora["ab"].scale == 1.0
    # Every layer either adapter adapts, and no other.
    assert set(combined_layers(model, "ab")) == set(combined_layers(model, "a")) | set(combined_layers(model, "b"))
    assert_weighted_sum_per_layer(model, "ab", WEIGHTS)


@pytest.mark.parametrize("how, rank", [("cat", None), ("svd", 100)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lm_head_only_combination_is_the_weighted_sum_of_logits(kind, how, rank):
    """With only the last layer adapted, nothing non-linear follows: the logits add up too."""
    model = with_adapters(kind, {"a": lora(2, 4, ["lm_head"]), "b": lora(3, 3, ["lm_head"], use_rslora=True)})
    inputs = inputs_for(kind)
    with torch.no_grad():
        with ft.disabled(model):
            base = output_of(model, inputs)
        outputs = {}
        for n in WEIGHTS:
            ft.set_active(model, n)
            outputs[n] = output_of(model, inputs)
        ft.combine(model, WEIGHTS, "ab", how=how, rank=rank)
        combined = output_of(model, inputs)
    expected = base + sum(w * (outputs[n] - base) for n, w in WEIGHTS.items())
    assert (combined - base).abs().max() > 1e-2, "the adapters should change the logits"
    assert (combined - expected).abs().max().item() <= 1e-5


# --- svd ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_svd_error_is_the_eckart_young_tail(kind):
    k = 2
    model = with_adapters(kind, PAIRS[kind])
    ft.combine(model, WEIGHTS, "ab", how="svd", rank=k)
    truncated = 0
    for path, layer in combined_layers(model, "ab").items():
        target = target_delta(layer, WEIGHTS)
        sigma = torch.linalg.svdvals(target)
        ranks = sum(layer.lora[n].rank for n in WEIGHTS if n in layer.lora)
        k_layer = min(k, ranks, *target.shape)
        assert layer.lora["ab"].rank == k_layer, path
        tail = sigma[k_layer:].pow(2).sum().sqrt().item()
        error = torch.linalg.matrix_norm(target - combined_delta(layer, "ab")).item()
        assert abs(error - tail) <= 1e-5 * torch.linalg.matrix_norm(target).item(), (path, error, tail)
        truncated += tail > 1e-3
    assert truncated, "some layer should need more than rank 2, so that the truncation is tested"


@pytest.mark.parametrize("kind", KINDS)
def test_svd_with_enough_rank_is_exact_and_rank_is_clamped(kind):
    model = with_adapters(kind, PAIRS[kind])
    ft.combine(model, WEIGHTS, "ab", how="svd", rank=100)
    for path, layer in combined_layers(model, "ab").items():
        ranks = sum(layer.lora[n].rank for n in WEIGHTS if n in layer.lora)
        # ΔW has at most Σ rᵢ (and min(out, in)) singular values: the rank is clamped to that.
        assert layer.lora["ab"].rank == min(100, ranks, *target_delta(layer, WEIGHTS).shape), path
    assert_weighted_sum_per_layer(model, "ab", WEIGHTS)


def test_svd_default_rank_is_the_largest_rank_on_each_layer():
    model = with_adapters("llama", PAIRS["llama"])
    ft.combine(model, WEIGHTS, "ab", how="svd")
    for path, layer in combined_layers(model, "ab").items():
        assert layer.lora["ab"].rank == max(layer.lora[n].rank for n in WEIGHTS if n in layer.lora), path


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4"])
def test_svd_refuses_a_rank_that_is_not_a_positive_integer(rank):
    model = with_adapters("llama", PAIRS["llama"])
    with pytest.raises(ft.ConfigError, match="must be a positive integer"):
        ft.combine(model, WEIGHTS, "ab", how="svd", rank=rank)


# --- linear ---------------------------------------------------------------------------------------

EQUAL_RANKS = {"a": lora(4, 8, ["q_proj", "v_proj"]), "b": lora(4, 6, ["v_proj", "o_proj"], use_rslora=True)}
SCALES = {"a": 8 / 4, "b": 6 / math.sqrt(4)}  # α/r, and α/√r for rsLoRA


@pytest.mark.parametrize("weights", [{"a": 0.6, "b": 0.3}, {"a": -0.9, "b": 0.2}], ids=["positive", "negative-sum"])
def test_linear_computes_its_documented_formula(weights):
    model = with_adapters("llama", EQUAL_RANKS)
    ft.combine(model, weights, "ab", how="linear")
    for path, layer in combined_layers(model, "ab").items():
        present = [n for n in weights if n in layer.lora]
        c = {n: weights[n] * SCALES[n] for n in present}
        total = sum(c.values())
        A = sum(c[n] * layer.lora[n].A for n in present) / math.sqrt(abs(total))
        B = sum(c[n] * layer.lora[n].B for n in present) * (math.copysign(1, total) / math.sqrt(abs(total)))
        got = layer.lora["ab"]
        assert got.scale == 1.0 and got.rank == 4
        torch.testing.assert_close(got.A, A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.B, B, atol=1e-6, rtol=1e-6)
        if len(present) == 1:  # one adapter alone is reproduced exactly
            torch.testing.assert_close(combined_delta(layer, "ab"), target_delta(layer, weights), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", ["A", "B"])
def test_linear_is_exact_when_the_adapters_share_a_factor(shared):
    model = with_adapters("llama", EQUAL_RANKS)
    with torch.no_grad():
        for layer in combined_layers(model, "b").values():
            if "a" in layer.lora:
                getattr(layer.lora["b"], shared).copy_(getattr(layer.lora["a"], shared))
    ft.combine(model, WEIGHTS, "ab", how="linear")
    assert_weighted_sum_per_layer(model, "ab", WEIGHTS)


def test_linear_is_not_exact_in_general():
    """The cross terms Bᵢ·Aⱼ remain: the docstring calls it an approximation, and it is one."""
    model = with_adapters("llama", EQUAL_RANKS)
    ft.combine(model, WEIGHTS, "ab", how="linear")
    layer = next(layer for layer in combined_layers(model, "ab").values() if "a" in layer.lora and "b" in layer.lora)
    assert (combined_delta(layer, "ab") - target_delta(layer, WEIGHTS)).abs().max() > 1e-3


def test_linear_refuses_unequal_ranks():
    model = with_adapters("llama", {"a": lora(2, 4, ["q_proj"]), "b": lora(4, 8, ["q_proj"])})
    with pytest.raises(ft.ConfigError) as info:
        ft.combine(model, WEIGHTS, "ab", how="linear")
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "{'a': 2, 'b': 4}" in message
    assert "how='cat'" in message and "how='svd'" in message
    assert "ab" not in adapter_state(model).configs, "a refused combination leaves the model as it was"


def test_linear_refuses_weights_that_cancel():
    model = with_adapters("llama", {"a": lora(4, 8, ["q_proj"]), "b": lora(4, 8, ["q_proj"])})
    with pytest.raises(ft.ConfigError, match="≈ 0"):
        ft.combine(model, {"a": 0.5, "b": -0.5}, "ab", how="linear")


# --- refusals -------------------------------------------------------------------------------------

def mixed_model():
    model = with_adapters("llama", {"a": lora(2, 4, ["q_proj"]), "b": lora(2, 4, ["v_proj"]),
                                    "d": lora(2, 4, ["o_proj"], use_dora=True),
                                    "s": lora(2, 4, ["up_proj"], bias="lora_only")})
    ft.attach(model, ft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), name="c")
    return model


@pytest.mark.parametrize("weights, name, options, expected", [
    ({"a": 1, "zz": 1}, "ab", {}, "no adapter named 'zz'; LoRA adapters attached: a, b, d, s"),
    ({"a": 1, "d": 1}, "ab", {}, "adapter 'd' uses DoRA"),
    ({"a": 1, "c": 1}, "ab", {}, "adapter 'c' is not LoRA (IA3Config); combine takes LoRA adapters only"),
    ({"a": 1, "s": 1}, "ab", {}, "bias='lora_only'"),
    ({"a": 1, "b": 1}, "a", {}, "an adapter named 'a' is already attached"),
    ({}, "ab", {}, "must be a non-empty mapping"),
    ([("a", 1)], "ab", {}, "must be a non-empty mapping"),
    ({"a": "0.5"}, "ab", {}, "weights['a']='0.5' must be a finite number"),
    ({"a": float("nan")}, "ab", {}, "must be a finite number"),
    ({"a": 1}, "ab", {"how": "sum"}, "how='sum' is not one of 'cat', 'linear', 'svd'"),
    ({"a": 1}, "ab", {"how": "cat", "rank": 4}, "rank=4 applies only to how='svd'"),
], ids=["unknown", "dora", "ia3", "bias", "existing-name", "empty", "not-a-dict", "weight-type", "nan",
        "how", "rank-with-cat"])
def test_refusals_name_what_was_given(weights, name, options, expected):
    model = mixed_model()
    before = list(adapter_state(model).configs)
    with pytest.raises(ft.ConfigError, match="combine") as info:
        ft.combine(model, weights, name, **options)
    assert expected in str(info.value)
    assert list(adapter_state(model).configs) == before


def test_refuses_a_merged_model_and_a_model_without_adapters():
    model = with_adapters("llama", PAIRS["llama"])
    ft.merge(model, unload=False)
    with pytest.raises(ft.ConfigError, match=r"call ft.unmerge\(model\) before combining"):
        ft.combine(model, WEIGHTS, "ab")
    with pytest.raises(ft.ConfigError, match="no feathertune adapters"):
        ft.combine(fresh_base("llama"), WEIGHTS, "ab")


# --- files ----------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("llama", "cat", None, PAIRS["llama"]),
    ("gpt2", "svd", 2, PAIRS["gpt2"]),
    ("cnn", "svd", None, PAIRS["cnn"]),
    ("llama", "linear", None, EQUAL_RANKS),
]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("kind, how, rank, configs", ROUND_TRIPS, ids=[f"{k}-{h}" for k, h, *_ in ROUND_TRIPS])
def test_combined_adapter_saves_and_loads_in_feathertune_and_peft(kind, how, rank, configs, tmp_path):
    model = with_adapters(kind, configs)
    ft.combine(model, WEIGHTS, "ab", how=how, rank=rank)
    inputs = inputs_for(kind)
    with torch.no_grad():
        expected = output_of(model, inputs)
        assert (expected - output_of(fresh_base(kind), inputs)).abs().max() > 1e-3
    ft.save_adapter(model, tmp_path, name="ab")
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {layer.lora["ab"].rank for layer in combined_layers(model, "ab").values()}
    assert bool(values["rank_pattern"]) == (len(ranks) > 1), values["rank_pattern"]
    assert values["rank_pattern"] == values["alpha_pattern"] and values["r"] == values["lora_alpha"]

    again = ft.load_adapter(fresh_base(kind), tmp_path, name="ab")
    with torch.no_grad():
        assert (output_of(again, inputs) - expected).abs().max().item() <= 1e-6

    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(fresh_base(kind), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    with torch.no_grad():
        assert (output_of(loaded, inputs) - expected).abs().max().item() <= 1e-5
