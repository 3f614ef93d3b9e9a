"""The contract every method keeps, checked over a matrix of methods × tiny models.

Each test states one promise of the public API and checks it for every method on tiny float32
models — Llama (nn.Linear), GPT-2 (HF Conv1D), a BERT classifier, and for LoRA a small CNN
(nn.Conv2d): init is a no-op where the method is zero-initialised, training touches only the
adapter, save/load round-trips exactly, disabling gives the base, merge/unmerge are exact and
idempotent (or refused clearly), deleting restores the base. Adapter parameters are found
through the site protocol (`feathertune.adapters.adapter_parameters`), never by name, so a new
method costs one row in METHODS (plus a SKIPS entry for a cell that cannot apply). Dropout is 0 so
every output is deterministic.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import feathertune as ft
from feathertune.adapters import adapter_parameters
from feathertune.registry import METHODS as REGISTRY
from feathertune.wrapping import BASE
from models import BUILDERS, inputs_for, output_of

R, ALPHA = 4, 8
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
    "cnn": ["conv1", "conv2"],
}
KINDS = ("llama", "gpt2", "bert", "cnn")
PARTIAL_MODULES = {"llama": ["mlp"], "gpt2": ["mlp"], "bert": ["attention", "classifier"], "cnn": ["conv2", "head"]}


def lora(**settings):
    return lambda kind: ("lora", {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS[kind],
                                  **settings})


def reft(variant):
    return lambda kind: ("reft", {"kind": variant, "r": 2, "positions": "f2+l2",
                                  **({"modules_to_save": ["classifier"]} if kind == "bert" else {})})


# method -> (kind -> (registry name, config values)), zero-initialised?, kinds it runs on
METHODS = {
    "lora": (lora(), True, KINDS),
    "rslora": (lora(use_rslora=True), True, KINDS),
    "dora": (lora(use_dora=True), True, KINDS),
    # The tiny BERT classifier's logits are ~0.02: scaling the encoder barely moves them, so the
    # matrix also saves (and perturbs) its head, as any classification fine-tune does.
    "ia3": (lambda kind: ("ia3", {"modules_to_save": ["classifier"]} if kind == "bert" else {}), True,
            ("llama", "gpt2", "bert")),
    "houlsby": (lambda kind: ("bottleneck", {"style": "houlsby"}), True, ("llama", "gpt2", "bert")),
    "pfeiffer": (lambda kind: ("bottleneck", {"style": "pfeiffer"}), True, ("llama", "gpt2", "bert")),
    # Not zero-initialised: the learned prompt changes the output from step 0.
    "prompt_tuning": (lambda kind: ("prompt_tuning", {"num_virtual_tokens": 4, **(
        {"modules_to_save": ["classifier"]} if kind == "bert" else {})}), False, ("llama", "gpt2", "bert")),
    "prefix_tuning": (lambda kind: ("prefix_tuning", {"num_virtual_tokens": 4}), False, ("llama", "gpt2")),
    "llama_adapter": (lambda kind: ("llama_adapter", {"adapter_len": 4, "adapter_layers": 2}), True, ("llama",)),
    # Partial fine-tuning: the top block (and the final norm above it), named modules, BitFit, everything.
    "partial_top": (lambda kind: ("partial", {"top_blocks": 1}), True, KINDS[:3]),
    "partial_named": (lambda kind: ("partial", {"modules": PARTIAL_MODULES[kind]}), True, KINDS),
    "bitfit": (lambda kind: ("partial", {"bias_only": True}), True, KINDS),
    "full": (lambda kind: ("partial", {"modules": "all"}), True, KINDS),
    # ReFT: random R, W, b edit the first and last two tokens at every block from step 0 (BERT's head
    # saved too, as for ia3: the edits alone move its tiny logits by ~2e-3).
    "loreft": (reft("loreft"), False, ("llama", "gpt2", "bert")),
    "direft": (reft("direft"), False, ("llama", "gpt2", "bert")),
}
NOT_LLAMA = ("LLaMA-Adapter needs Llama-style attention (rotary q/k/v/o); other architectures are refused "
             "by name (tests/test_llama_adapter.py)")
# (method, kind) -> why the cell cannot apply; every other cell in METHODS × KINDS runs.
SKIPS: dict[tuple[str, str], str] = {
    ("llama_adapter", "gpt2"): NOT_LLAMA, ("llama_adapter", "bert"): NOT_LLAMA,
    ("prefix_tuning", "bert"): "prefix tuning needs a forward that takes a KV cache; BERT's encoder has none and is "
                               "refused by name (tests/test_prefix_tuning.py)",
}


def cells():
    for method, (_, _, kinds) in METHODS.items():
        for kind in KINDS:
            if kind in kinds or (method, kind) in SKIPS:
                marks = [pytest.mark.skip(reason=SKIPS[(method, kind)])] if (method, kind) in SKIPS else []
                yield pytest.param(method, kind, id=f"{kind}-{method}", marks=marks)


MATRIX = pytest.mark.parametrize("method, kind", list(cells()))
_PRISTINE: dict[str, nn.Module] = {}


# --- helpers ---------------------------------------------------------------------------------------
def fresh_base(kind: str) -> nn.Module:
    """A new copy of the tiny base model (built once per kind, then deep-copied)."""
    if kind not in _PRISTINE:
        _PRISTINE[kind] = BUILDERS[kind](seed=0, dtype=torch.float32)
    return copy.deepcopy(_PRISTINE[kind])


def config(method: str, kind: str):
    name, values = METHODS[method][0](kind)
    return REGISTRY[name].config_class(**values)


def mergeable(method: str, kind: str) -> bool:
    return REGISTRY[METHODS[method][0](kind)[0]].mergeable


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return output_of(model, inputs).detach().clone()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def ids(params) -> set[int]:
    return {id(p) for p in params}


def base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to no adapter, asked of the sites."""
    state = model.__dict__.get("_feathertune")
    adapter = ids(p for name in (state.configs if state else ()) for p in adapter_parameters(model, name))
    return {n: p for n, p in model.named_parameters() if id(p) not in adapter}


def feathertune_modules(model: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if type(m).__module__.split(".")[0] == "feathertune"]


@torch.no_grad()
def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """Move every tensor of adapter `name` off its initial value, so that each check bites:
    zeros (LoRA's B, gates) become small noise, the rest (magnitudes, scales, prompts) ±20%."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, name):
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.copy_(torch.where(p == 0, 0.1 * noise, p * (1 + 0.2 * noise)))


def perturbed_model(method: str, kind: str):
    """(adapted model with random adapter values, inputs, base output, adapted output)."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    base_out = run(model, inputs)
    ft.attach(model, config(method, kind))
    perturb(model)
    adapted_out = run(model, inputs)
    assert max_diff(adapted_out, base_out) > 1e-3, "the perturbed adapter should change the output"
    return model, inputs, base_out, adapted_out


# --- the contract matrix -----------------------------------------------------------------------------
@MATRIX
def test_init_output_equals_base(method, kind):
    """A freshly attached zero-initialised adapter starts exactly at the base model."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    base_out = run(model, inputs)
    assert ft.attach(model, config(method, kind)) is model
    assert feathertune_modules(model), "attach should add sites to the model"
    if not METHODS[method][1]:
        pytest.skip(f"{method} is not zero-initialised: its learned prompt changes the output from step 0")
    assert max_diff(run(model, inputs), base_out) <= 1e-6


@MATRIX
def test_training_step_changes_only_the_adapter(method, kind):
    """Exactly the adapter's parameters are trainable and get gradients; a step changes only them."""
    model = ft.attach(fresh_base(kind), config(method, kind))
    mine = ids(adapter_parameters(model, "default"))
    assert mine, "the sites should report the adapter's parameters"
    named = dict(model.named_parameters())
    wrong = [n for n, p in named.items() if p.requires_grad != (id(p) in mine)]
    assert not wrong, f"requires_grad should be True exactly for the adapter's parameters: {wrong[:5]}"
    before = {n: p.detach().clone() for n, p in named.items()}

    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all params: a leak would show
    output_of(model, inputs_for(kind)).pow(2).mean().backward()
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for n, p in named.items() if id(p) in mine}, "gradients should reach the adapter only"
    optimiser.step()

    changed_base = [n for n, p in named.items() if id(p) not in mine and not torch.equal(p, before[n])]
    assert not changed_base, f"base parameters changed: {changed_base[:5]}"
    assert any(not torch.equal(p, before[n]) for n, p in named.items() if id(p) in mine), "the adapter did not train"


@MATRIX
def test_save_load_roundtrip(method, kind, tmp_path):
    """save_adapter then load_adapter onto a fresh base reproduces the outputs exactly."""
    model, inputs, _, adapted_out = perturbed_model(method, kind)
    ft.save_adapter(model, tmp_path / "adapter")
    fresh = fresh_base(kind)
    assert ft.load_adapter(fresh, tmp_path / "adapter") is fresh
    assert max_diff(run(fresh, inputs), adapted_out) <= 1e-7
    assert not any(p.requires_grad for p in fresh.parameters()), "trainable=False should freeze all"


@MATRIX
def test_disabled_gives_base_then_restores(method, kind):
    """Inside ft.disabled the model is the base; afterwards the adapter is back (merged or not)."""
    model, inputs, base_out, adapted_out = perturbed_model(method, kind)
    with ft.disabled(model) as inside:
        assert inside is model
        assert max_diff(run(model, inputs), base_out) <= 1e-6
    assert max_diff(run(model, inputs), adapted_out) <= 1e-6
    if mergeable(method, kind):
        ft.merge(model, unload=False)
        with ft.disabled(model):
            assert max_diff(run(model, inputs), base_out) <= 1e-5
        assert max_diff(run(model, inputs), adapted_out) <= 1e-5


@MATRIX
def test_merge_matches_unmerged_output_or_is_refused(method, kind):
    """merge(unload=False) keeps the output, unload=True leaves no feathertune module; a method
    that cannot merge says so and leaves the model as it was."""
    model, inputs, _, adapted_out = perturbed_model(method, kind)
    if not mergeable(method, kind):
        with pytest.raises(ft.ConfigError, match="cannot be merged"):
            ft.merge(model)
        assert max_diff(run(model, inputs), adapted_out) == 0
        return
    assert ft.merge(model, unload=False) is model
    assert max_diff(run(model, inputs), adapted_out) <= 1e-5
    plain = ft.merge(model, unload=True)
    assert plain is model
    assert not feathertune_modules(plain), feathertune_modules(plain)
    assert max_diff(run(plain, inputs), adapted_out) <= 1e-5


@MATRIX
def test_merge_twice_changes_nothing(method, kind):
    """A second merge (kept or unloaded) leaves the merged weights bit-for-bit as they were."""
    if not mergeable(method, kind):
        pytest.skip(f"{method} cannot be merged (test_merge_matches_unmerged_output_or_is_refused checks the error)")
    model, inputs, _, _ = perturbed_model(method, kind)
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
def test_unmerge_restores_base_weights(method, kind):
    """unmerge puts every base weight back (≤1e-6) and the adapter runs separately again."""
    if not mergeable(method, kind):
        pytest.skip(f"{method} cannot be merged")
    model, inputs, _, adapted_out = perturbed_model(method, kind)
    original = {n: p.detach().clone() for n, p in base_params(model).items()}
    ft.merge(model, unload=False)
    current = base_params(model)
    # BitFit on a bias-free layer adds the bias it trained when merging.
    assert current.keys() != original.keys() or any(not torch.equal(current[n], w) for n, w in original.items()), \
        "merge changed no weight"

    assert ft.unmerge(model) is model
    current = base_params(model)
    assert current.keys() == original.keys()
    worst = {n: max_diff(current[n], w) for n, w in original.items()}
    bad = {n: d for n, d in worst.items() if d > 1e-6}
    assert not bad, f"weights not restored: {bad}"
    assert max_diff(run(model, inputs), adapted_out) <= 1e-5
    ft.set_active(model, "default")  # refused while merged, so this also checks the merged flag


@MATRIX
def test_delete_restores_the_base(method, kind):
    """Deleting the only adapter leaves the original modules, parameters and outputs."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    base_out = run(model, inputs)
    original = {n: (m, type(m)) for n, m in model.named_modules()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft.attach(model, config(method, kind))
    perturb(model)
    ft.delete_adapter(model, "default")
    assert not feathertune_modules(model), feathertune_modules(model)
    assert {n: (m, type(m)) for n, m in model.named_modules()} == original
    assert {n: p for n, p in model.named_parameters()}.keys() == weights.keys()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert max_diff(run(model, inputs), base_out) == 0
    with pytest.raises(ft.ConfigError):
        ft.set_active(model, "default")


# --- LoRA's counts and several LoRA adapters ---------------------------------------------------------------------

def lora_config(**overrides) -> ft.LoraConfig:
    values = {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS["llama"], **overrides}
    return ft.LoraConfig(**values)

@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_trainable_parameter_count_llama(variant):
    """trainable = Σ r·(in + out) over adapted linears (+ out per layer for DoRA's magnitude)."""
    base = fresh_base("llama")
    expected, adapted = 0, 0
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS["llama"]:
            adapted += 1
            expected += R * (module.in_features + module.out_features)
            expected += module.out_features if variant == "dora" else 0
    assert adapted == 2 * len(LORA_TARGETS["llama"])
    base_total = sum(p.numel() for p in base.parameters())
    model = ft.attach(base, config(variant, "llama"))
    assert ft.trainable_parameters(model) == (expected, base_total + expected)


def test_two_adapters_add_up_and_delete_cleanly():
    """Two active LoRA adapters add their updates; deleting them leaves b alone, then the plain model."""
    model = fresh_base("llama")
    inputs = inputs_for("llama")
    base_out = run(model, inputs)
    originals = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS["llama"]}
    ft.attach(model, lora_config(), name="a")
    ft.attach(model, lora_config(r=2, alpha=3), name="b")
    layers = {n: model.get_submodule(n) for n in originals}
    assert all(layers[n] is not originals[n] for n in originals), "attach should wrap each target"
    perturb(model, "a")
    perturb(model, "b", seed=1)

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
    assert not adapter_parameters(model, "a") and adapter_parameters(model, "b")
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
    ft.attach(model, lora_config(target_modules=["lm_head"]), name="a")
    ft.attach(model, lora_config(target_modules=["lm_head"], r=2), name="b")
    perturb(model, "a")
    perturb(model, "b", seed=1)
    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        ft.set_active(model, active)
        outs["".join(active)] = run(model, inputs)
    expected = (outs["a"] - base_out) + (outs["b"] - base_out)
    assert max_diff(outs["ab"] - base_out, expected) <= 1e-5
    assert max_diff(outs["ab"], base_out) > 1e-3


@MATRIX
def test_greedy_generate_with_the_kv_cache_equals_recomputing_each_step(method, kind):
    """Cached decoding (prefill, then one token a step) picks the tokens a full forward per step picks."""
    if kind not in ("llama", "gpt2"):
        pytest.skip(f"{kind}: not a causal LM")
    model, inputs, _, _ = perturbed_model(method, kind)
    prompt = inputs["input_ids"][:1, :5]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             do_sample=False, use_cache=True, pad_token_id=0)
        ids = prompt
        for _ in range(out.shape[1] - prompt.shape[1]):
            # prompt_lengths: ReFT edits the prompt only, as generate's prefill does (the rest ignore it)
            logits = model(input_ids=ids, prompt_lengths=torch.tensor([prompt.shape[1]])).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape[1] > prompt.shape[1]
    assert torch.equal(out, ids), (out, ids)


@MATRIX
def test_mixed_batch_rows_equal_each_alone_or_are_refused(method, kind):
    """`adapter_names=[...]` gives each row what that adapter (or the base) gives it alone; a method
    that changes the sequence itself refuses a mixed batch clearly."""
    model = fresh_base(kind)
    inputs = inputs_for(kind)
    for seed, name in enumerate(("a", "b")):
        ft.attach(model, config(method, kind), name=name)
        perturb(model, name, seed=seed)
    names = ["a", "b", BASE]
    if not REGISTRY[METHODS[method][0](kind)[0]].mixed_batch:
        with pytest.raises(ft.ConfigError, match="cannot run in a mixed batch"):
            run(model, {**inputs, "adapter_names": names})
        return
    mixed = run(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        alone_inputs = {k: v[row:row + 1] for k, v in inputs.items()}
        if name == BASE:
            with ft.disabled(model):
                alone = run(model, alone_inputs)
        else:
            ft.set_active(model, name)
            alone = run(model, alone_inputs)
        assert max_diff(mixed[row:row + 1], alone) <= 1e-5, (row, name)


@MATRIX
def test_inspect_prints_method_mergeable_and_the_trainable_count(method, kind, tmp_path):
    """`feathertune inspect` on a saved adapter names the method, whether it merges, and exactly
    the parameters that trained (what ft.trainable_parameters counts)."""
    from feathertune.inspect import describe

    model = ft.attach(fresh_base(kind), config(method, kind))
    trainable, _ = ft.trainable_parameters(model)
    shown = describe(ft.save_adapter(model, tmp_path / "adapter"))
    spec = REGISTRY[METHODS[method][0](kind)[0]]
    assert f"method:      {spec.name} ({spec.peft_type})" in shown, shown
    assert ("; mergeable" if spec.mergeable else "not mergeable") in shown, shown
    assert f"trainable:   {trainable:,} parameters" in shown, shown


@MATRIX
def test_dpo_step_trains_the_adapter_against_the_base_as_reference(method, kind):
    """DPO works with every method on a causal LM: the reference log-probabilities are the base's,
    and the step's gradients reach the adapter only."""
    if kind not in ("llama", "gpt2"):
        pytest.skip("DPO tunes causal language models")
    from feathertune.loss import sequence_logps
    from feathertune.train.dpo import dpo_loss_sum, reference_logps

    ids_ = torch.randint(1, 96, (4, 10), generator=torch.Generator().manual_seed(3))  # 2 pairs: rows 0-1 vs 2-3
    labels = ids_.clone()
    labels[:, :5] = -100  # the prompt
    batch = {"input_ids": ids_, "attention_mask": torch.ones_like(ids_), "labels": labels}
    base = fresh_base(kind)
    with torch.no_grad():
        expected = sequence_logps(base, batch)
    model, _, _, _ = perturbed_model(method, kind)
    model.train()
    assert torch.allclose(reference_logps(model, batch), expected, rtol=1e-5, atol=1e-5)
    summed, stats = dpo_loss_sum(model, batch, beta=0.1)
    summed.backward()
    mine = ids(adapter_parameters(model, "default"))
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= mine and set(stats) == {"reward_accuracy", "reward_margin", "logps_chosen",
                                                             "logps_rejected"}
