"""(IA)³: the numbers against plain-PyTorch formulas, the files against PEFT, the counts, generation,
mixed batches and the errors. (The cross-method contract — init, grads, save/load, disable, merge,
delete — is checked in test_contract.py.)

Formulas are written here from the paper, independently of feathertune.functional:
    output scaling   y = l ⊙ (W·x + b)        l stored (out, 1)
    input scaling    y = W·(l ⊙ x) + b        l stored (1, in)   (the FFN's down projection)
with HF Conv1D storing W as (in, out). Vectors are moved off their initial ones so every check bites.
"""

from __future__ import annotations

import copy
import json
import re
import types
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import feathertune as ft
from feathertune.adapters import adapter_parameters
from feathertune.methods.ia3 import IA3Config, IA3Layer
from feathertune.wrapping import wrapped_layers
from models import BUILDERS, SmallCNN, logits_of, random_ids, tiny_llama

pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]

PREFIX = "base_model.model."


# --- helpers --------------------------------------------------------------------------------------

@torch.no_grad()
def perturb(model, name: str = "default", seed: int = 0) -> None:
    """Every tensor of adapter `name` times 1 + N(0, 0.3²): the vectors (ones at init) leave the
    identity, and a modules_to_save copy leaves the base's values."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, name):
        p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def with_random_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """HF initialises biases to zero, which would hide whether output scaling reaches the bias."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".bias") and "LayerNorm" not in name and "ln_" not in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def base_model(kind: str, dtype=torch.float32) -> nn.Module:
    return with_random_biases(BUILDERS[kind](seed=0, dtype=dtype))


def ia3_layers(model) -> dict[str, IA3Layer]:
    return {n: layer for n, layer in wrapped_layers(model) if isinstance(layer, IA3Layer)}


def is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)


@torch.no_grad()
def rescaled_base(base: nn.Module, model: nn.Module, names: list[str]) -> nn.Module:
    """The base with each adapted weight rescaled by hand: the plain model (IA)³ amounts to."""
    ref = copy.deepcopy(base)
    for path, layer in ia3_layers(model).items():
        module = ref.get_submodule(path)
        conv = is_conv1d(module)
        for name in names:
            l = layer.ia3_l[name].detach()  # (out, 1): rows of W (out, in); (1, in): its columns
            module.weight.mul_(l.T if conv else l)  # Conv1D holds Wᵀ
            if not layer.feedforward[name] and module.bias is not None:  # output scaling hits b too
                module.bias.mul_(l.flatten())
    return ref


# --- the forward against the formula ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_each_layer_matches_the_formula(kind):
    """Per layer, on random inputs, with two adapters active (their vectors multiply): ≤1e-10 in float64."""
    model = base_model(kind, torch.float64)
    ft.attach(model, IA3Config(), name="a")
    ft.attach(model, IA3Config(), name="b")
    perturb(model, "a", seed=0)
    perturb(model, "b", seed=1)
    ft.set_active(model, ["a", "b"])
    g = torch.Generator().manual_seed(2)
    for path, layer in ia3_layers(model).items():
        W = layer.base.weight.detach()
        b = layer.base.bias.detach() if layer.base.bias is not None else 0  # Llama has none
        W = W.T if is_conv1d(layer.base) else W  # (out, in)
        x = torch.randn(2, 5, W.shape[1], generator=g, dtype=torch.float64)
        la, lb = layer.ia3_l["a"].detach().flatten(), layer.ia3_l["b"].detach().flatten()
        if layer.feedforward["a"]:
            expected = (x * la * lb) @ W.T + b
        else:
            expected = (x @ W.T + b) * la * lb
        with torch.no_grad():
            assert (layer(x) - expected).abs().max() <= 1e-10, path


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_model_equals_the_base_with_rescaled_weights(kind):
    """Whole-model logits equal the base model whose weights were rescaled by hand: ≤1e-10 in float64."""
    base = base_model(kind, torch.float64)
    model = ft.attach(copy.deepcopy(base), IA3Config())
    perturb(model)
    ids = random_ids()
    adapted = logits_of(model, ids)
    assert (adapted - logits_of(base, ids)).abs().max() > 1e-5, "the perturbed vectors should change the output"
    assert (adapted - logits_of(rescaled_base(base, model, ["default"]), ids)).abs().max() <= 1e-10


def test_default_targets_and_orientation_follow_peft():
    """None means PEFT's per-architecture modules; the feedforward ones scale their input."""
    expected = {
        "llama": {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True},
        "gpt2": {"attn.c_attn": False, "mlp.c_proj": True},
        "bert": {"attention.self.key": False, "attention.self.value": False,
                 "attention.output.dense": True, "output.dense": True},  # PEFT's plain endswith rule
    }
    for kind, per_block in expected.items():
        model = ft.attach(BUILDERS[kind](seed=0), IA3Config())
        layers = ia3_layers(model)
        found = {}
        for path, layer in layers.items():
            block_part = re.sub(r"^.*?\.\d+\.", "", path)  # 'model.layers.0.mlp.down_proj' -> 'mlp.down_proj'
            found[block_part] = layer.feedforward["default"]
            shape = tuple(layer.ia3_l["default"].shape)
            assert (shape[0] == 1) is layer.feedforward["default"], (path, shape)
        assert found == per_block, kind
        assert len(layers) == 2 * len(per_block)


# --- PEFT, both ways -------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
PEFT_KINDS = {"llama": {}, "gpt2": {}, "bert": {"modules_to_save": ["classifier"]}}


def read_file(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", list(PEFT_KINDS))
def test_feathertune_file_loads_in_peft(kind, tmp_path):
    model = ft.attach(base_model(kind), IA3Config(**PEFT_KINDS[kind]))
    perturb(model)  # the classifier copy too
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "IA3"
    if kind == "bert":
        assert values["task_type"] == "SEQ_CLS"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base_model(kind), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ours = read_file(tmp_path)
    theirs = peft.utils.get_peft_model_state_dict(loaded)
    assert set(ours) == set(theirs)
    assert all(torch.equal(theirs[k], t) for k, t in ours.items())
    ids = random_ids()
    assert (logits_of(loaded, ids) - logits_of(model, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(PEFT_KINDS))
def test_peft_file_loads_in_feathertune(kind, tmp_path):
    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    peft_model = peft.get_peft_model(base_model(kind), peft.IA3Config(**task))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "peft"))
    model = ft.load_adapter(base_model(kind), tmp_path / "peft")
    peft_layers = {n.removeprefix(PREFIX) for n, m in peft_model.named_modules()
                   if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert set(ia3_layers(model)) == peft_layers
    ids = random_ids()
    base = logits_of(base_model(kind), ids)
    assert (logits_of(peft_model, ids) - base).abs().max() > 1e-3
    assert (logits_of(model, ids) - logits_of(peft_model, ids)).abs().max() <= 1e-5
    ft.save_adapter(model, tmp_path / "again")
    theirs, again = read_file(tmp_path / "peft"), read_file(tmp_path / "again")
    assert set(again) == set(theirs)
    assert all(torch.equal(again[k], t) for k, t in theirs.items())


# --- counts, generation, mixed batches ---------------------------------------------------------------

def test_trainable_count_is_the_sum_of_scaled_widths():
    """Σ over targets of out (output scaling) or in (input scaling), from the model configs."""
    expected = {
        "llama": lambda c: c.num_hidden_layers * (2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
                                                  + c.intermediate_size),  # k, v out; down_proj in
        "gpt2": lambda c: c.n_layer * (3 * c.n_embd + 4 * c.n_embd),  # c_attn out; mlp.c_proj in
        "bert": lambda c: c.num_hidden_layers * (2 * c.hidden_size + c.hidden_size + c.intermediate_size),
    }
    for kind, formula in expected.items():
        model = BUILDERS[kind](seed=0)
        total = sum(p.numel() for p in model.parameters())
        ft.attach(model, IA3Config())
        assert ft.trainable_parameters(model) == (formula(model.config), total + formula(model.config)), kind


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_architecture_names_itself_and_the_known_ones():
    model = SmallCNN()
    model.config = types.SimpleNamespace(model_type="mamba")
    with pytest.raises(ft.ConfigError) as info:
        ft.attach(model, IA3Config())
    message = str(info.value)
    for word in ("'mamba'", "llama", "gpt2", "bert", "mistral", "qwen2", "target_modules"):
        assert word in message, (word, message)
    # Targets given: no defaults needed (and no feedforward module unless named).
    ft.attach(model, IA3Config(target_modules=["head"]))
    assert set(ia3_layers(model)) == {"head"}


def test_invalid_values_are_all_listed():
    with pytest.raises(ft.ConfigError) as info:
        IA3Config(target_modules=[], feedforward_modules=3, modules_to_save="classifier", init_ia3_weights="yes")
    problems = info.value.problems
    assert len(problems) == 4, problems
    for field in ("target_modules=[]", "feedforward_modules=3", "modules_to_save='classifier'",
                  "init_ia3_weights='yes'"):
        assert any(field in p for p in problems), (field, problems)
    with pytest.raises(ft.ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ft.ConfigError, match="not a valid regular expression"):
        IA3Config(target_modules="(k_proj")


def test_feedforward_entry_matching_no_target_is_refused():
    with pytest.raises(ft.ConfigError, match="'dwn_proj' matches none of the"):
        ft.attach(tiny_llama(), IA3Config(target_modules="all-linear", feedforward_modules=["dwn_proj"]))


def test_peft_file_with_exclude_modules_is_refused(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.IA3Config(exclude_modules=["model.layers.0.self_attn.k_proj"]))
    peft_model.save_pretrained(str(tmp_path))
    with pytest.raises(ft.UnsupportedAdapterError, match="exclude_modules"):
        ft.load_adapter(tiny_llama(), tmp_path)
