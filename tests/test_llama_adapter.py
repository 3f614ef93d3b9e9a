"""LLaMA-Adapter (methods/llama_adapter.py): the numbers, PEFT's files, the KV cache and bad input.

- at init (gate 0) the model is exactly the base;
- with perturbed prompts and gates the model equals the base with an independent float64 formula
  added to each adapted attention layer by a forward hook (loops over heads, no functional.py);
- files round-trip with PEFT's ADAPTION_PROMPT both ways, same logits;
- the trainable count is the paper's adapter_layers · (adapter_len · hidden + 1);
- greedy generate() with the KV cache equals recomputing the whole sequence at every step;
- mixed batches give each row what it gets alone; wrong models and configs are refused clearly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open

import feathertune as ft
from feathertune.errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from feathertune.methods.llama_adapter import AdaptedAttention, LlamaAdapterConfig
from feathertune.wrapping import BASE, wrapped_layers
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
HIDDEN = 32


def tiny(kind: str, dtype=torch.float32, **extra) -> torch.nn.Module:
    """Tiny Llama-family models: 2 layers, 4 query heads over 2 key/value heads (GQA)."""
    import transformers

    if kind == "llama" and not extra:
        return tiny_llama(seed=0, dtype=dtype)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v have biases
    }[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return model_class(config).to(dtype).eval()


def batch(lengths=(7, 4), seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded prompts of these lengths, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.ones(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : width - n], mask[row, : width - n] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def sites(model) -> dict[str, AdaptedAttention]:
    return {n: layer for n, layer in wrapped_layers(model) if isinstance(layer, AdaptedAttention)}


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    """Non-zero gates and fresh prompts in every adapter, so that each one changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for site in sites(model).values():
        for prompt in site.adaption.values():
            prompt.prompt.copy_(torch.randn(prompt.prompt.shape, generator=g, dtype=prompt.prompt.dtype))
            prompt.gate.copy_(0.5 + torch.rand(1, generator=g, dtype=prompt.gate.dtype))


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.detach().clone()


# --- the maths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_init_equals_base_exactly(kind):
    base = tiny(kind)
    model = ft.attach(copy.deepcopy(base), LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    assert len(sites(model)) == 2
    assert torch.equal(logits(model, batch()), logits(base, batch()))


def reference_prompt_output(attn, hidden, cos, sin, prompt, gate):
    """o_proj(g · softmax(q·k_Pᵀ/√d) · v_P) head by head, written out with no shared code."""
    H, H_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    d = attn.head_dim

    def linear(layer, x):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    q = linear(attn.q_proj, hidden)  # (B, T, H·d)
    k, v = linear(attn.k_proj, prompt[0]), linear(attn.v_proj, prompt[0])  # (L, H_kv·d)
    heads = []
    for h in range(H):
        kv = h // (H // H_kv)
        qh = q[..., h * d:(h + 1) * d]
        qh = qh * cos + torch.cat([-qh[..., d // 2:], qh[..., :d // 2]], dim=-1) * sin  # RoPE
        scores = qh @ k[:, kv * d:(kv + 1) * d].T / math.sqrt(d)  # (B, T, L)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        heads.append(gate * weights @ v[:, kv * d:(kv + 1) * d])
    return linear(attn.o_proj, torch.cat(heads, dim=-1))


@pytest.mark.parametrize("kind,layers", [("llama", 2), ("llama", 1), ("mistral", 2), ("qwen2", 2)])
def test_forward_matches_independent_formula(kind, layers):
    base = tiny(kind, dtype=torch.float64)
    model = ft.attach(copy.deepcopy(base), LlamaAdapterConfig(adapter_len=5, adapter_layers=layers))
    perturb(model)
    adapted = sites(model)
    assert sorted(adapted) == [f"model.layers.{i}.self_attn" for i in range(2 - layers, 2)]

    def hook_for(site):
        prompt = site.adaption["default"]

        def add_prompt_output(attn, args, kwargs, output):
            cos, sin = kwargs["position_embeddings"]
            extra = reference_prompt_output(attn, kwargs["hidden_states"], cos, sin, prompt.prompt, prompt.gate)
            return (output[0] + extra, *output[1:])
        return add_prompt_output

    for path, site in adapted.items():
        base.get_submodule(path).register_forward_hook(hook_for(site), with_kwargs=True)
    inputs = batch()
    expected, actual = logits(base, inputs), logits(model, inputs)
    assert (actual - logits(tiny(kind, dtype=torch.float64), inputs)).abs().max() > 1e-3
    assert (actual - expected).abs().max() <= 1e-10


@pytest.mark.parametrize("layers,length", [(1, 3), (2, 5)])
def test_trainable_parameter_count_is_the_papers(layers, length):
    model = ft.attach(tiny_llama(), LlamaAdapterConfig(adapter_len=length, adapter_layers=layers))
    trainable, _ = ft.trainable_parameters(model)
    assert trainable == layers * (length * HIDDEN + 1)


# --- PEFT's files, both ways ----------------------------------------------------------------------

peft = pytest.importorskip("peft")


def file_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_feathertune_file_loads_in_peft(kind, tmp_path):
    model = ft.attach(tiny(kind), LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    perturb(model)
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "ADAPTION_PROMPT" and values["task_type"] == "CAUSAL_LM"
    assert set(values) <= {f.name for f in dataclasses.fields(peft.AdaptionPromptConfig)}
    assert set(file_tensors(tmp_path)) == {f"base_model.model.model.layers.1.self_attn.adaption_{s}"
                                           for s in ("prompt", "gate")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny(kind), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    inputs = batch()
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_peft_file_loads_in_feathertune(kind, tmp_path):
    theirs = peft.get_peft_model(tiny(kind), peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2,
                                                                       task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    inputs = batch()
    peft_out = logits(theirs, inputs)
    assert (peft_out - logits(tiny(kind), inputs)).abs().max() > 1e-3

    model = ft.load_adapter(tiny(kind), tmp_path / "peft")
    assert sorted(sites(model)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert (logits(model, inputs) - peft_out).abs().max() <= 1e-5
    ft.save_adapter(model, tmp_path / "again")  # the same tensors under the same names
    again, original = file_tensors(tmp_path / "again"), file_tensors(tmp_path / "peft")
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in again)


def test_files_that_do_not_fit_are_refused(tmp_path):
    model = ft.attach(tiny_llama(), LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    ft.save_adapter(model, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    values = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**values, "adapter_layers": 2}))
    with pytest.raises(AdapterMismatchError, match=r"layers\.0\.self_attn.*the file has none"):
        ft.load_adapter(tiny_llama(), tmp_path)
    config_file.write_text(json.dumps({**values, "use_rope_on_prompt": True}))
    with pytest.raises(UnsupportedAdapterError, match="use_rope_on_prompt=True"):
        ft.load_adapter(tiny_llama(), tmp_path)


# --- the KV cache ---------------------------------------------------------------------------------

def greedy_by_recomputing(model, input_ids, attention_mask, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache: the whole sequence again at every step, positions as generate's."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("lengths", [(6,), (7, 4)], ids=["one-prompt", "left-padded-pair"])
@torch.no_grad()
def test_generate_with_cache_equals_recomputing(lengths):
    model = ft.attach(tiny_llama(dtype=torch.float64), LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    perturb(model)
    model.generation_config.eos_token_id = None  # always `steps` tokens, as the loop makes
    model.generation_config.pad_token_id = 0
    inputs = batch(lengths)
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, greedy_by_recomputing(model, inputs["input_ids"], inputs["attention_mask"], 8))
    with ft.disabled(model):
        assert not torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), cached)
    # The prompts never enter the cache: it holds the real sequence only.
    assert model(**inputs, use_cache=True).past_key_values.get_seq_length() == max(lengths)


# --- mixed batches --------------------------------------------------------------------------------

@torch.no_grad()
def test_mixed_batch_rows_equal_rows_run_alone():
    model = tiny_llama(dtype=torch.float64)
    ft.attach(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=2), name="a")
    ft.attach(model, LlamaAdapterConfig(adapter_len=5, adapter_layers=1), name="b")  # top layer only
    perturb(model)
    names = ["a", "b", BASE, "a"]
    inputs = batch((7, 4, 6, 5))
    mixed = logits(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        alone = {k: v[row:row + 1] for k, v in inputs.items()}
        if name == BASE:
            with ft.disabled(model):
                expected = logits(model, alone)
        else:
            ft.set_active(model, [name])
            expected = logits(model, alone)
        assert (mixed[row:row + 1] - expected).abs().max() <= 1e-12, (row, name)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the adapters do differ


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,model_type", [(tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_other_architectures_are_refused_by_name(build, model_type):
    with pytest.raises(ConfigError) as caught:
        ft.attach(build(), LlamaAdapterConfig(adapter_layers=2))
    message = str(caught.value)
    assert f"model_type={model_type!r}" in message and "llama, mistral, qwen2" in message


def test_invalid_config_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        LlamaAdapterConfig(adapter_len=0, adapter_layers="2", target_modules="model.self_attn")
    assert [p.split("=")[0] for p in caught.value.problems] == ["adapter_len", "adapter_layers", "target_modules"]
    with pytest.raises(ConfigError, match="unknown key 'adapter_length'.*did you mean 'adapter_len'"):
        LlamaAdapterConfig.from_dict({"adapter_length": 4})


@pytest.mark.parametrize("config,extra,expected", [
    (LlamaAdapterConfig(adapter_layers=3), {}, "adapter_layers=3 but this model has 2 'self_attn' layers"),
    (LlamaAdapterConfig(adapter_layers=2, target_modules="attn"), {}, "matched no module.*'self_attn'"),
    (LlamaAdapterConfig(adapter_layers=2), {"attention_bias": True}, "o_proj has a bias"),
], ids=["too-many-layers", "no-such-module", "o-proj-bias"])
def test_configs_that_do_not_fit_the_model_are_refused(config, extra, expected):
    model = tiny("llama", **extra)
    with pytest.raises(ConfigError, match=expected):
        ft.attach(model, config)
    assert not sites(model)  # nothing left behind
