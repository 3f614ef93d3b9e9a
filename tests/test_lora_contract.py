"""The LoRA contract, checked on every model kind × variant (plain LoRA, rsLoRA, DoRA).

Each test states one promise of the public API (init is a no-op, training touches only adapters,
save/load round-trips, disabling gives the base, merge/unmerge are exact and idempotent) and checks
it on tiny float32 models: Llama (nn.Linear), GPT-2 (HF Conv1D), BERT classifier and a small CNN
(nn.Conv2d). Dropout is 0 so every output is deterministic.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import feathertune as ft
from models import BUILDERS, inputs_for, output_of

R, ALPHA = 4, 8
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
    "cnn": ["conv1", "conv2"],
}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
MATRIX = pytest.mark.parametrize(
    "kind, variant", [pytest.param(k, v, id=f"{k}-{v}") for k in TARGETS for v in VARIANTS])

_PRISTINE: dict[str, nn.Module] = {}


# --- helpers ---------------------------------------------------------------------------------------
def fresh_base(kind: str) -> nn.Module:
    """A new copy of the tiny base model (built once per kind, then deep-copied)."""
    if kind not in _PRISTINE:
        _PRISTINE[kind] = BUILDERS[kind](seed=0, dtype=torch.float32)
    return copy.deepcopy(_PRISTINE[kind])


def config(kind: str, variant: str, **overrides) -> ft.LoraConfig:
    values = {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS[kind], **VARIANTS[variant]}
    return ft.LoraConfig(**{**values, **overrides})


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return output_of(model, inputs).detach().clone()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def is_adapter(name: str) -> bool:
    return ".lora." in name


def base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not is_adapter(n)}


def feathertune_modules(model: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if type(m).__module__.split(".")[0] == "feathertune"]


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter tensor random values (B non-zero, magnitude off ‖W‖) so checks bite."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if name.endswith(".magnitude"):
            p.mul_(1 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)


def perturbed_model(kind: str, variant: str):
    """(adapted model with random adapter values, inputs, base output, adapted output)."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    base_out = run(model, inputs)
    ft.attach(model, config(kind, variant))
    perturb(model)
    adapted_out = run(model, inputs)
    assert max_diff(adapted_out, base_out) > 1e-3, "the perturbed adapter should change the output"
    return model, inputs, base_out, adapted_out


# --- the contract matrix -----------------------------------------------------------------------------
@MATRIX
def test_init_output_equals_base(kind, variant):
    """A freshly attached adapter starts exactly at the base model."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    base_out = run(model, inputs)
    assert ft.attach(model, config(kind, variant)) is model
    assert feathertune_modules(model), "attach should wrap the targeted layers"
    assert max_diff(run(model, inputs), base_out) <= 1e-6


@MATRIX
def test_training_step_changes_only_adapters(kind, variant):
    """Only adapter parameters are trainable, and one optimiser step changes only them."""
    model = ft.attach(fresh_base(kind), config(kind, variant))
    named = dict(model.named_parameters())
    wrong = [n for n, p in named.items() if p.requires_grad != is_adapter(n)]
    assert not wrong, f"requires_grad should be True exactly for adapter parameters: {wrong[:5]}"
    before = {n: p.detach().clone() for n, p in named.items()}

    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all params: a leak would show
    output_of(model, inputs_for(kind)).pow(2).mean().backward()
    optimiser.step()

    changed_base = [n for n, p in named.items() if not is_adapter(n) and not torch.equal(p, before[n])]
    assert not changed_base, f"base parameters changed: {changed_base[:5]}"
    must_change = [n for n in named if n.endswith(".B") or n.endswith(".magnitude")]
    assert must_change and (variant != "dora" or any(n.endswith(".magnitude") for n in must_change))
    unchanged = [n for n in must_change if torch.equal(named[n], before[n])]
    assert not unchanged, f"adapter parameters did not train: {unchanged[:5]}"


@MATRIX
def test_save_load_roundtrip(kind, variant, tmp_path):
    """save_adapter then load_adapter onto a fresh base reproduces the outputs exactly."""
    model, inputs, _, adapted_out = perturbed_model(kind, variant)
    ft.save_adapter(model, tmp_path / "adapter")
    fresh = fresh_base(kind)
    assert ft.load_adapter(fresh, tmp_path / "adapter") is fresh
    assert max_diff(run(fresh, inputs), adapted_out) <= 1e-7
    assert not any(p.requires_grad for p in fresh.parameters()), "trainable=False should freeze all"


@MATRIX
def test_disabled_gives_base_then_restores(kind, variant):
    """Inside ft.disabled the model is the base; afterwards the adapter is back (merged or not)."""
    model, inputs, base_out, adapted_out = perturbed_model(kind, variant)
    with ft.disabled(model) as inside:
        assert inside is model
        assert max_diff(run(model, inputs), base_out) <= 1e-6
    assert max_diff(run(model, inputs), adapted_out) <= 1e-6

    ft.merge(model, unload=False)
    with ft.disabled(model):
        assert max_diff(run(model, inputs), base_out) <= 1e-5
    assert max_diff(run(model, inputs), adapted_out) <= 1e-5


@MATRIX
def test_merge_matches_unmerged_output(kind, variant):
    """merge(unload=False) keeps the output; merge(unload=True) also leaves no feathertune modules."""
    model, inputs, _, adapted_out = perturbed_model(kind, variant)
    assert ft.merge(model, unload=False) is model
    assert max_diff(run(model, inputs), adapted_out) <= 1e-5

    plain = ft.merge(model, unload=True)
    assert plain is model
    assert not feathertune_modules(plain), feathertune_modules(plain)
    assert max_diff(run(plain, inputs), adapted_out) <= 1e-5


@MATRIX
def test_merge_twice_changes_nothing(kind, variant):
    """A second merge (kept or unloaded) leaves the merged weights bit-for-bit as they were."""
    model, inputs, _, _ = perturbed_model(kind, variant)
    params = list(base_params(model).values())  # the same Parameter objects survive unloading
    ft.merge(model, unload=False)
    once = [p.detach().clone() for p in params]
    once_out = run(model, inputs)

    ft.merge(model, unload=False)
    assert all(torch.equal(p, q) for p, q in zip(params, once)), "second merge changed the weights"
    assert torch.equal(run(model, inputs), once_out)

    ft.merge(model, unload=True)
    assert all(torch.equal(p, q) for p, q in zip(params, once)), "unloading a merged model re-merged it"
    assert torch.equal(run(model, inputs), once_out)


@MATRIX
def test_unmerge_restores_base_weights(kind, variant):
    """unmerge puts every base weight back (≤1e-6) and the adapter runs separately again."""
    model, inputs, _, adapted_out = perturbed_model(kind, variant)
    original = {n: p.detach().clone() for n, p in base_params(model).items()}
    ft.merge(model, unload=False)
    current = base_params(model)
    assert any(not torch.equal(current[n], w) for n, w in original.items()), "merge changed no weight"

    assert ft.unmerge(model) is model
    current = base_params(model)
    assert current.keys() == original.keys()
    worst = {n: max_diff(current[n], w) for n, w in original.items()}
    bad = {n: d for n, d in worst.items() if d > 1e-6}
    assert not bad, f"weights not restored: {bad}"
    assert max_diff(run(model, inputs), adapted_out) <= 1e-5
    ft.set_active(model, "default")  # refused while merged, so this also checks the merged flag


# --- counts and several adapters ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trainable_parameter_count_llama(variant):
    """trainable = Σ r·(in + out) over adapted linears (+ out per layer for DoRA's magnitude)."""
    base = fresh_base("llama")
    expected, adapted = 0, 0
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS["llama"]:
            adapted += 1
            expected += R * (module.in_features + module.out_features)
            expected += module.out_features if variant == "dora" else 0
    assert adapted == 2 * len(TARGETS["llama"])
    base_total = sum(p.numel() for p in base.parameters())
    model = ft.attach(base, config("llama", variant))
    assert ft.trainable_parameters(model) == (expected, base_total + expected)


def test_two_adapters_add_up_and_delete_cleanly():
    """Two active LoRA adapters add their updates; deleting them leaves b alone, then the plain model."""
    model = fresh_base("llama")
    inputs = inputs_for("llama")
    base_out = run(model, inputs)
    originals = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS["llama"]}
    ft.attach(model, config("llama", "lora"), name="a")
    ft.attach(model, config("llama", "lora", r=2, alpha=3), name="b")
    layers = {n: model.get_submodule(n) for n in originals}
    assert all(layers[n] is not originals[n] for n in originals), "attach should wrap each target"
    perturb(model)

    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        ft.set_active(model, active)
        outs["".join(active)] = run(model, inputs)
    assert min(max_diff(outs["ab"], outs["a"]), max_diff(outs["ab"], outs["b"])) > 1e-3

    # At each adapted layer: y_ab − y_0 = (y_a − y_0) + (y_b − y_0) on the same input.
    x = {n: torch.randn(3, 5, originals[n].in_features, generator=torch.Generator().manual_seed(i))
         for i, n in enumerate(layers)}
    for n, layer in layers.items():
        ys = {}
        for active in (["a"], ["b"], ["a", "b"]):
            ft.set_active(model, active)
            ys["".join(active)] = run(layer, {"x": x[n]})
        with ft.disabled(model):
            y0 = run(layer, {"x": x[n]})
        assert max_diff(ys["ab"] - y0, (ys["a"] - y0) + (ys["b"] - y0)) <= 1e-5, n

    ft.set_active(model, ["a", "b"])
    ft.delete_adapter(model, "a")
    names = [n for n, _ in model.named_parameters()]
    assert not any(".lora.a." in n for n in names) and any(".lora.b." in n for n in names)
    assert max_diff(run(model, inputs), outs["b"]) <= 1e-6

    ft.delete_adapter(model, "b")
    assert not feathertune_modules(model), feathertune_modules(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert max_diff(run(model, inputs), base_out) <= 1e-6
    with pytest.raises(ft.ConfigError):
        ft.set_active(model, "b")


def test_two_adapters_on_the_head_add_at_the_model_output():
    """With only lm_head adapted (nothing nonlinear after it), out_ab − base = Δ_a + Δ_b exactly."""
    model = fresh_base("llama")
    inputs = inputs_for("llama")
    base_out = run(model, inputs)
    ft.attach(model, config("llama", "lora", target_modules=["lm_head"]), name="a")
    ft.attach(model, config("llama", "lora", target_modules=["lm_head"], r=2), name="b")
    perturb(model)
    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        ft.set_active(model, active)
        outs["".join(active)] = run(model, inputs)
    expected = (outs["a"] - base_out) + (outs["b"] - base_out)
    assert max_diff(outs["ab"] - base_out, expected) <= 1e-5
    assert max_diff(outs["ab"], base_out) > 1e-3
