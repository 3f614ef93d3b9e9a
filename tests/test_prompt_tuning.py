"""Prompt tuning (methods/prompt_tuning.py): the numbers, PEFT's files, generation and bad input.

- with a random prompt the model equals the base fed [P; E[x]] by hand (float64, 1e-10), on a
  causal LM (Llama, GPT-2: logits of the virtual positions dropped) and a classifier (BERT);
- files round-trip with PEFT's PROMPT_TUNING both ways, same logits (PEFT's virtual positions
  dropped), on Llama, GPT-2 and a BERT classifier whose head is in modules_to_save;
- the trainable count is the paper's n·d;
- greedy generate() with the KV cache equals recomputing the whole sequence at every step,
  left-padded batch included; a cached decode step equals the full forward's last position;
- labels passed to the model give the loss computed from the returned (aligned) logits;
- the inits, and wrong configs, mixed batches and several active adapters refused clearly.

The generation helpers here are shared with tests/test_prefix_tuning.py.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import feathertune as ft
from feathertune.errors import ConfigError, UnsupportedAdapterError
from feathertune.methods import prompt
from feathertune.methods.prompt_tuning import PromptTuningConfig, config_from_file
from models import VOCAB, tiny_bert, tiny_chat_model_dir, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

N = 4  # virtual tokens
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
CAUSAL = ("llama", "gpt2")


# --- helpers (also used by test_prefix_tuning.py) -----------------------------------------------

def batch(seed: int = 1, rows: int = 2, length: int = 7, padded: bool = True):
    """input_ids and a 2-D mask; row 1 is left-padded by 3 when `padded`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
        ids[1, :3] = 0
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """What generate() gives a left-padded row: positions counted over its real tokens."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def perturb(model, seed: int = 0, scale: float = 0.5) -> None:
    """Random values in every trainable tensor (the prompt, a modules_to_save copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@torch.no_grad()
def greedy_by_recomputing(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence goes through the model at every step."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask),
                       use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def check_generate_matches_recomputing(model) -> None:
    """generate() with the KV cache (prefill, then 1-token decode steps) = the cache-free loop."""
    model.generation_config.eos_token_id = None  # exactly 8 new tokens in both
    model.generation_config.pad_token_id = 0
    lengths = []
    # Runs after feathertune's pre-hook: prompt tuning's prefill has input_ids=None by then.
    hook = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(
        None if kw.get("input_ids") is None else kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for padded in (False, True):
            ids, mask = batch(seed=3, padded=padded)
            lengths.clear()
            with torch.no_grad():
                cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            assert lengths[1:] == [1] * 7, lengths  # a prefill, then 7 cached one-token steps
            assert torch.equal(cached, greedy_by_recomputing(model, ids, mask, 8)), padded
    finally:
        hook.remove()


def check_cached_step_matches_full(model) -> None:
    """prefill(x[:-1]) then one cached step on x[-1] gives the full forward's last logits."""
    ids, mask = batch(seed=4)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[:, -1]
        first = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                      position_ids=mask_positions(mask)[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=mask_positions(mask)[:, -1:],
                     cache=first.cache, use_cache=True).logits[:, -1]
    assert (step - full).abs().max() < 1e-10


def check_labels_loss(model) -> None:
    """The loss from labels equals cross-entropy over the returned logits (shifted, −100 skipped)."""
    ids, mask = batch(seed=5)
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, 2:4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape[1] == ids.shape[1]
    # transformers computes its loss in float32 whatever the model's dtype; so does this.
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    assert (out.loss - expected).abs() < 1e-6


def file_keys(directory) -> dict[str, tuple]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


# --- the forward --------------------------------------------------------------------------------

def attached(kind: str, dtype=torch.float64, **config):
    base = BUILDERS[kind](seed=0, dtype=dtype)
    if kind == "bert":
        config.setdefault("modules_to_save", ["classifier"])
    model = ft.attach(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=N, **config))
    perturb(model)
    return base, model.eval()


def prompt_of(model) -> torch.Tensor:
    return model.feathertune_prompt_tuning.adapters["default"].weight.detach()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_forward_is_the_base_fed_the_prompt_then_the_tokens(kind):
    base, model = attached(kind)
    if kind == "bert":  # the model's own head copy, so that the base runs the same classifier
        base.classifier.load_state_dict(model.classifier.copies["default"].state_dict())
    ids, mask = batch()
    P = prompt_of(model)
    E = base.get_input_embeddings().weight[ids]  # (B, T, d)
    reference = base(inputs_embeds=torch.cat([P.expand(2, -1, -1), E], dim=1),
                     attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], dim=1)).logits
    if kind in CAUSAL:
        reference = reference[:, N:]  # the caller's tokens only
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == reference.shape
    assert (out - reference).abs().max() < 1e-10


def test_position_and_token_type_ids_are_shifted_not_dropped():
    """Given positions p become [0…n-1, p+n]; token types get zeros in front (BERT segments)."""
    base, model = attached("llama")
    ids, mask = batch()
    positions = mask_positions(mask)
    P, E = prompt_of(model), base.get_input_embeddings().weight[ids]
    reference = base(inputs_embeds=torch.cat([P.expand(2, -1, -1), E], dim=1),
                     attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], dim=1),
                     position_ids=torch.cat([torch.arange(N).expand(2, N), positions + N], dim=1)).logits[:, N:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (out - reference).abs().max() < 1e-10

    base, model = attached("bert")
    base.classifier.load_state_dict(model.classifier.copies["default"].state_dict())
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    E = base.get_input_embeddings().weight[ids]
    reference = base(inputs_embeds=torch.cat([prompt_of(model).expand(2, -1, -1), E], dim=1),
                     token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), types], dim=1)).logits
    assert (model(input_ids=ids, token_type_ids=types).logits - reference).abs().max() < 1e-10


def test_outputs_line_up_with_the_input_ids():
    """Hidden states lose the virtual positions; logits_to_keep and return_dict=False still work."""
    _, model = attached("llama")
    ids, mask = batch()
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert all(h.shape[1] == ids.shape[1] for h in full.hidden_states)
    last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert torch.allclose(last, full.logits[:, -1:], atol=1e-12)
    as_tuple = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], full.logits, atol=1e-12)


def test_cache_position_lands_after_the_virtual_tokens():
    """cache_position (remote-code models) is rebuilt to index the cache, whichever count it used."""
    at = torch.arange(5, 8)
    shifted = prompt.shift_for_virtual_tokens({"cache_position": at}, N, in_inputs=False, cache_start=5 + N)
    assert shifted["cache_position"].tolist() == [5 + N, 6 + N, 7 + N]
    prefill = prompt.shift_for_virtual_tokens({"cache_position": torch.arange(3)}, N, in_inputs=True, cache_start=0)
    assert prefill["cache_position"].tolist() == list(range(N + 3))


@pytest.mark.parametrize("kind", CAUSAL)
def test_labels_give_the_loss_of_the_returned_logits(kind):
    check_labels_loss(attached(kind)[1])


def test_classifier_labels_are_left_alone():
    _, model = attached("bert")
    ids, mask = batch()
    labels = torch.tensor([0, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert (out.loss - F.cross_entropy(out.logits, labels)).abs() < 1e-10


@pytest.mark.parametrize("kind", CAUSAL)
def test_generate_with_the_cache_equals_recomputing(kind):
    _, model = attached(kind)
    check_cached_step_matches_full(model)
    check_generate_matches_recomputing(model)


# --- parameters and inits -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_count_is_n_times_d(kind):
    model = ft.attach(BUILDERS[kind](seed=0), PromptTuningConfig(num_virtual_tokens=N))
    assert ft.trainable_parameters(model)[0] == N * 32  # n · d, d = 32


def test_inits():
    base = tiny_llama(seed=0)
    E = base.get_input_embeddings().weight.detach()
    model = ft.attach(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=50))
    P = prompt_of(model)
    assert P.min() >= -0.5 and P.max() <= 0.5 and P.std() > 0.2  # U(−0.5, 0.5), the paper's
    model = ft.attach(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=N, init="vocab"))
    assert all(any(torch.equal(row, e) for e in E) for row in prompt_of(model))


def test_text_init_uses_the_models_own_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_chat_model_dir(tmp_path / "model", ["the cat sat on the mat", "a dog ran"])
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    ids = AutoTokenizer.from_pretrained(str(directory))("the cat", add_special_tokens=False)["input_ids"]
    ft.attach(model, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="the cat"))
    cycled = (ids * 5)[:5]
    assert torch.equal(prompt_of(model), model.get_input_embeddings().weight[cycled].detach())

    nameless = tiny_llama(seed=0)  # built from a config: no directory to read a tokenizer from
    with pytest.raises(ConfigError, match="tokenizer"):
        ft.attach(nameless, PromptTuningConfig(init="text", init_text="the cat"))
    with pytest.raises(ConfigError, match="offline"):
        ft.attach(nameless, PromptTuningConfig(init="text", init_text="x", tokenizer=str(tmp_path / "none")))


# --- PEFT interop -------------------------------------------------------------------------------

PEFT_TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def logits_of(model, kind: str, peft_model: bool = False) -> torch.Tensor:
    ids, mask = batch(padded=False)
    mask[1, -2:] = 0  # right padding: PEFT has no position ids to get wrong
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out[:, N:] if peft_model and kind in CAUSAL else out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_feathertune_file_loads_in_peft(kind, tmp_path):
    _, model = attached(kind, dtype=torch.float32)
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["task_type"] == PEFT_TASKS[kind] and values["peft_type"] == "PROMPT_TUNING"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(BUILDERS[kind](seed=0), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert (logits_of(loaded, kind, peft_model=True) - logits_of(model, kind)).abs().max() < 1e-5
    # The same names and shapes as PEFT's own file for this adapter.
    theirs = peft.get_peft_model(BUILDERS[kind](seed=0), peft.PromptTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=N, modules_to_save=values["modules_to_save"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert file_keys(tmp_path) == file_keys(tmp_path / "peft")
    # And the config PEFT writes, key for key (PEFT lists its SEQ_CLS heads again, whatever the model has).
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(written.pop("modules_to_save") or []) >= set(values.pop("modules_to_save") or [])
    assert {k: v for k, v in written.items() if k != "peft_version"} == values


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_peft_file_loads_in_feathertune(kind, tmp_path):
    theirs = peft.get_peft_model(BUILDERS[kind](seed=0), peft.PromptTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"))
    perturb(theirs, seed=2)
    theirs.eval().save_pretrained(str(tmp_path))
    model = ft.load_adapter(BUILDERS[kind](seed=0), tmp_path)
    assert not any(p.requires_grad for p in model.parameters())
    assert (logits_of(model, kind) - logits_of(theirs, kind, peft_model=True)).abs().max() < 1e-5
    ft.save_adapter(model, tmp_path / "again")  # and back, tensor for tensor
    assert file_keys(tmp_path / "again") == file_keys(tmp_path)


# --- bad input ----------------------------------------------------------------------------------

def test_invalid_config_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        PromptTuningConfig(num_virtual_tokens=0, init="words", init_text=3, modules_to_save="classifier")
    assert len(caught.value.problems) == 4, caught.value.problems
    with pytest.raises(ConfigError, match="init_text"):
        PromptTuningConfig(init="text")


def test_mixed_batch_and_several_active_adapters_are_refused():
    model = ft.attach(tiny_llama(seed=0), PromptTuningConfig(num_virtual_tokens=N), name="a")
    ids, _ = batch()
    with pytest.raises(ConfigError, match="mixed batch"):
        model(input_ids=ids, adapter_names=["a", "__base__"])
    ft.attach(model, PromptTuningConfig(num_virtual_tokens=2), name="b")
    ft.set_active(model, ["a", "b"])
    with pytest.raises(ConfigError, match="only one of them"):
        model(input_ids=ids)
    ft.set_active(model, "b")
    assert model(input_ids=ids).logits.shape[1] == ids.shape[1]


def test_peft_features_we_lack_are_refused():
    with pytest.raises(UnsupportedAdapterError, match="num_transformer_submodules"):
        config_from_file({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2}, "f")
    with pytest.raises(UnsupportedAdapterError, match="prompt_encoder_hidden"):
        config_from_file({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_encoder_hidden": 8}, "f")
