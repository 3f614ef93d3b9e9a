"""Bottleneck adapters: the numbers against a plain-PyTorch formula, where they sit, the counts, the
file, generation, mixed batches and the errors. (The cross-method contract — init, grads,
save/load, disable, merge refused, delete — is checked in test_contract.py.)

The reference is the base model itself with forward hooks that add, on each sublayer output h,

    W_up·f(W_down·h + b_down) + b_up

written here independently of feathertune.functional (f from its textbook definition). Every tensor
is moved off its initial value (W_up starts at zero) so that each check bites.
"""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
from safetensors import safe_open
from torch import nn

import feathertune as ft
from feathertune.adapters import adapter_parameters
from feathertune.methods.bottleneck import BottleneckConfig, BottleneckLayer
from feathertune.wrapping import wrapped_layers
from models import BUILDERS, SmallCNN, logits_of, random_ids, tiny_llama

pytest.importorskip("transformers")

PREFIX = "base_model.model."
F_REFERENCE = {
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "tanh": lambda t: (t.exp() - (-t).exp()) / (t.exp() + (-t).exp()),
    "silu": lambda t: t / (1 + (-t).exp()),
}
# The sublayer output projections, per block, that each style adapts.
SITES = {
    "llama": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"]},
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]},
    "bert": {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": ["output.dense"]},
}
BLOCKS = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}


# --- helpers --------------------------------------------------------------------------------------

@torch.no_grad()
def perturb(model, name: str = "default", seed: int = 0) -> None:
    """Every tensor of adapter `name` + N(0, 0.3²): W_up and the biases leave zero."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, name):
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def base_model(kind: str, dtype=torch.float32) -> nn.Module:
    """A tiny base with random biases (HF zeroes them), so h = W·x + b really carries its bias."""
    model = BUILDERS[kind](seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if name.endswith(".bias") and "LayerNorm" not in name and "ln_" not in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def bottleneck_layers(model) -> dict[str, BottleneckLayer]:
    return {n: layer for n, layer in wrapped_layers(model) if isinstance(layer, BottleneckLayer)}


def expected_sites(kind: str, style: str, blocks: int = 2) -> list[str]:
    return [BLOCKS[kind].format(i) + s for i in range(blocks) for s in SITES[kind][style]]


def hooked_base(base: nn.Module, model: nn.Module, non_linearity: str, names: list[str]) -> nn.Module:
    """The base with forward hooks adding each adapter's W_up·f(W_down·h + b_down) + b_up to h."""
    ref = copy.deepcopy(base)
    f = F_REFERENCE[non_linearity]
    for path, layer in bottleneck_layers(model).items():
        adapters = [layer.bottleneck[n] for n in names]
        tensors = [tuple(t.detach() for t in (a.adapter_down.weight, a.adapter_down.bias,
                                                a.adapter_up.weight, a.adapter_up.bias)) for a in adapters]

        def hook(module, args, h, tensors=tensors):
            return h + sum(f(h @ Wd.T + bd) @ Wu.T + bu for Wd, bd, Wu, bu in tensors)

        ref.get_submodule(path).register_forward_hook(hook)
    return ref


# --- the forward against the formula, and where the adapters sit -------------------------------------

@pytest.mark.parametrize("kind, style, non_linearity", [
    ("llama", "houlsby", "relu"), ("llama", "pfeiffer", "gelu"), ("llama", "houlsby", "tanh"),
    ("llama", "houlsby", "silu"), ("gpt2", "houlsby", "gelu"), ("gpt2", "pfeiffer", "relu"),
    ("bert", "houlsby", "relu"), ("bert", "pfeiffer", "silu"),
])
def test_model_equals_the_base_with_hooked_adapters(kind, style, non_linearity):
    """Whole-model logits equal the hooked base on random inputs: ≤1e-10 in float64."""
    base = base_model(kind, torch.float64)
    model = ft.attach(copy.deepcopy(base), BottleneckConfig(style=style, non_linearity=non_linearity))
    assert list(bottleneck_layers(model)) == expected_sites(kind, style)
    perturb(model)
    ids = random_ids()
    adapted = logits_of(model, ids)
    assert (adapted - logits_of(base, ids)).abs().max() > 1e-5, "the perturbed adapters should change the output"
    assert (adapted - logits_of(hooked_base(base, model, non_linearity, ["default"]), ids)).abs().max() <= 1e-10


def test_two_active_adapters_each_read_h_and_add_up():
    base = tiny_llama(seed=0, dtype=torch.float64)
    model = copy.deepcopy(base)
    ft.attach(model, BottleneckConfig(), name="a")
    ft.attach(model, BottleneckConfig(bottleneck_size=3), name="b")
    perturb(model, "a", seed=0)
    perturb(model, "b", seed=1)
    ft.set_active(model, ["a", "b"])
    ids = random_ids()
    assert (logits_of(model, ids) - logits_of(hooked_base(base, model, "relu", ["a", "b"]), ids)).abs().max() <= 1e-10


def test_given_target_modules_replace_the_style():
    model = ft.attach(tiny_llama(), BottleneckConfig(style="pfeiffer", target_modules=["o_proj"]))
    assert list(bottleneck_layers(model)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


# --- counts and the file ----------------------------------------------------------------------------

@pytest.mark.parametrize("settings, m", [({}, 2), ({"bottleneck_size": 5}, 5), ({"reduction_factor": 4}, 8),
                                         ({"reduction_factor": 64}, 1)])
def test_trainable_count_is_2dm_plus_d_plus_m_per_layer(settings, m):
    for kind in ("llama", "gpt2", "bert"):
        model = BUILDERS[kind](seed=0)
        total = sum(p.numel() for p in model.parameters())
        ft.attach(model, BottleneckConfig(**settings))
        d = 32  # every tiny model's hidden size
        expected = len(expected_sites(kind, "houlsby")) * (2 * d * m + d + m)
        assert ft.trainable_parameters(model) == (expected, total + expected), kind


def test_file_holds_the_four_tensors_per_site_and_the_resolved_config(tmp_path):
    model = ft.attach(BUILDERS["bert"](seed=0), BottleneckConfig(bottleneck_size=3, non_linearity="gelu",
                                                                modules_to_save=["classifier"]))
    perturb(model)
    ft.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {"classifier.weight": (3, 32), "classifier.bias": (3,)}
    for site in expected_sites("bert", "houlsby"):
        expected.update({f"{site}.adapter_down.weight": (3, 32), f"{site}.adapter_down.bias": (3,),
                         f"{site}.adapter_up.weight": (32, 3), f"{site}.adapter_up.bias": (32,)})
    assert shapes == {PREFIX + k: v for k, v in expected.items()}
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "BOTTLENECK"
    assert values["target_modules"] == expected_sites("bert", "houlsby")  # exact paths
    assert (values["style"], values["bottleneck_size"], values["non_linearity"]) == ("houlsby", 3, "gelu")
    assert values["modules_to_save"] == ["classifier"] and values["task_type"] == "SEQ_CLS"
    loaded = ft.load_adapter(BUILDERS["bert"](seed=0), tmp_path)
    ids = random_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_architecture_names_itself_and_the_known_ones():
    model = SmallCNN()
    model.config = types.SimpleNamespace(model_type="mamba")
    with pytest.raises(ft.ConfigError) as info:
        ft.attach(model, BottleneckConfig())
    message = str(info.value)
    for word in ("'mamba'", "llama", "gpt2", "bert", "mistral", "qwen2", "target_modules"):
        assert word in message, (word, message)
    ft.attach(model, BottleneckConfig(target_modules=["head"]))  # targets given: no defaults needed
    assert set(bottleneck_layers(model)) == {"head"}


def test_invalid_values_are_all_listed():
    with pytest.raises(ft.ConfigError) as info:
        BottleneckConfig(style="parallel", reduction_factor=0, bottleneck_size=2.5, non_linearity="swish",
                         target_modules=[], modules_to_save="classifier")
    problems = info.value.problems
    assert len(problems) == 6, problems
    for field in ("style='parallel'", "reduction_factor=0", "bottleneck_size=2.5", "non_linearity='swish'",
                  "target_modules=[]", "modules_to_save='classifier'"):
        assert any(field in p for p in problems), (field, problems)
    assert any("houlsby, pfeiffer" in p for p in problems) and any("relu, gelu, tanh, silu" in p for p in problems)


def test_merge_is_refused_and_leaves_the_model_as_it_was():
    model = ft.attach(tiny_llama(), BottleneckConfig())
    perturb(model)
    ids = random_ids()
    before = logits_of(model, ids)
    with pytest.raises(ft.ConfigError, match="cannot be merged"):
        ft.merge(model)
    assert torch.equal(logits_of(model, ids), before)


def test_file_with_unknown_keys_is_refused(tmp_path):
    model = ft.attach(tiny_llama(), BottleneckConfig())
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    values["adapter_scaling"] = 2.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(ft.UnsupportedAdapterError, match="adapter_scaling"):
        ft.load_adapter(tiny_llama(), tmp_path)
