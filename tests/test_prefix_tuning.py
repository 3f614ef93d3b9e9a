"""Prefix tuning (methods/prefix_tuning.py): the numbers, PEFT's files, the KV cache and bad input.

- with random prefixes the model equals the base run on a KV cache built by hand from the flat
  prefix in PEFT's layout (float64, 1e-10), plain and through the reparameterisation MLP;
- files round-trip with PEFT's PREFIX_TUNING both ways on a tiny Llama with grouped-query
  attention, same logits: saved by feathertune with and without prefix_projection (folded), and a
  PEFT file trained with prefix_projection=True loads (as plain prefixes);
- the trainable count is 2·L·n·d_kv, and the MLP's before folding;
- greedy generate() with the KV cache equals recomputing the whole sequence at every step
  (left-padded batch included), on Llama and GPT-2; given position ids are shifted by n;
- labels give the loss of the returned logits;
- an encoder (BERT) is refused by name; mixed batches and wrong configs are refused clearly.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import DynamicCache

import feathertune as ft
from feathertune.checkpoint import adapter_file_tensors, restore_tensors
from feathertune.errors import ConfigError, UnsupportedAdapterError
from feathertune.methods.prefix_tuning import PrefixTuningConfig
from models import tiny_bert, tiny_gpt2, tiny_llama
from test_prompt_tuning import (batch, check_cached_step_matches_full, check_generate_matches_recomputing,
                                check_labels_loss, file_keys, mask_positions, perturb)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning",
                                        "ignore:.*past_key_values.*:FutureWarning")

N = 3  # virtual tokens
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# (layers, key/value heads, head width): Llama has 4 query heads over 2 key/value heads of 8.
GEOMETRY = {"llama": (2, 2, 8), "gpt2": (2, 4, 8)}


def attached(kind: str, dtype=torch.float64, **config):
    base = BUILDERS[kind](seed=0, dtype=dtype)
    model = ft.attach(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=N, **config))
    perturb(model, scale=0.3)
    return base, model.eval()


def flat_prefix(model) -> torch.Tensor:
    """The (n, L·2·d_kv) prefix, computed here from the adapter's parameters."""
    adapter = model.feathertune_prefix_tuning.adapters["default"]
    if adapter.prefix is not None:
        return adapter.prefix.detach()
    hidden = torch.tanh(adapter.embedding @ adapter.hidden_layer.weight.T + adapter.hidden_layer.bias)
    return (hidden @ adapter.output_layer.weight.T + adapter.output_layer.bias).detach()


def hand_built_cache(prefix: torch.Tensor, kind: str, rows: int) -> DynamicCache:
    """PEFT's layout: a virtual token's row is (2L, H, d_h), 2l = layer l's key, 2l+1 its value."""
    layers, heads, head_dim = GEOMETRY[kind]
    cache = DynamicCache()
    for layer in range(layers):
        pair = []
        for which in (2 * layer, 2 * layer + 1):
            per_token = [prefix[i].reshape(2 * layers, heads, head_dim)[which] for i in range(N)]  # N × (H, d_h)
            pair.append(torch.stack(per_token, dim=1).unsqueeze(0).repeat(rows, 1, 1, 1))  # (B, H, n, d_h)
        cache.update(pair[0], pair[1], layer)
    return cache


# --- the forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_is_the_base_on_a_hand_built_cache(kind, projection):
    base, model = attached(kind, prefix_projection=projection)
    ids, mask = batch()
    reference = base(input_ids=ids, attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], dim=1),
                     cache=hand_built_cache(flat_prefix(model), kind, 2)).logits
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == reference.shape
    assert (out - reference).abs().max() < 1e-10


def test_given_positions_are_shifted_by_n():
    """position_ids p mean what the default does: p + n, after the n cached prefix tokens."""
    _, model = attached("llama")
    ids, mask = batch(padded=False)
    default = model(input_ids=ids, attention_mask=mask).logits
    given = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    assert (given - default).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_labels_give_the_loss_of_the_returned_logits(kind):
    check_labels_loss(attached(kind)[1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_recomputing(kind):
    _, model = attached(kind)
    check_cached_step_matches_full(model)
    check_generate_matches_recomputing(model)


def test_gradients_reach_the_prefix_through_the_cache():
    _, model = attached("llama", dtype=torch.float32, prefix_projection=True)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


# --- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_count_is_the_papers(kind, tmp_path):
    layers, heads, head_dim = GEOMETRY[kind]
    d_kv = heads * head_dim
    plain = 2 * layers * N * d_kv
    model = ft.attach(BUILDERS[kind](seed=0), PrefixTuningConfig(num_virtual_tokens=N))
    assert ft.trainable_parameters(model)[0] == plain
    h = 24
    model = ft.attach(BUILDERS[kind](seed=0), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                                                 encoder_hidden_size=h))
    # P' (n, d_kv), then Linear(d_kv, h) and Linear(h, L·2·d_kv), biases included
    assert ft.trainable_parameters(model)[0] == N * d_kv + (d_kv * h + h) + (h * 2 * layers * d_kv + 2 * layers * d_kv)
    ft.save_adapter(model, tmp_path)
    loaded = ft.load_adapter(BUILDERS[kind](seed=0), tmp_path, trainable=True)
    assert ft.trainable_parameters(loaded)[0] == plain  # folded into plain prefixes


# --- PEFT interop -------------------------------------------------------------------------------

def logits_of(model) -> torch.Tensor:
    ids, mask = batch(padded=False)
    mask[1, -2:] = 0  # right padding: no position ids involved
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_load(directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(directory)).eval()
    problems = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    assert not problems, problems
    return loaded


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
def test_feathertune_file_loads_in_peft(projection, tmp_path):
    _, model = attached("llama", dtype=torch.float32, prefix_projection=projection)
    ft.save_adapter(model, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (values["peft_type"], values["task_type"], values["token_dim"], values["num_attention_heads"]) == \
        ("PREFIX_TUNING", "CAUSAL_LM", 16, 2)  # d_kv = 2 key/value heads · 8
    assert (logits_of(peft_load(tmp_path)) - logits_of(model)).abs().max() < 1e-5
    # What PEFT itself writes for this adapter: the same tensor names and shapes, the same config.
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert file_keys(tmp_path) == file_keys(tmp_path / "peft")  # {'prompt_embeddings': (n, L·2·d_kv)}
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "peft_version"} == values


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
def test_peft_file_loads_in_feathertune(projection, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection))
    perturb(theirs, seed=2, scale=0.3)
    theirs.eval()
    expected = logits_of(theirs)
    theirs.save_pretrained(str(tmp_path))
    model = ft.load_adapter(tiny_llama(seed=0), tmp_path)
    assert model.feathertune_prefix_tuning.adapters["default"].prefix is not None  # plain
    assert (logits_of(model) - expected).abs().max() < 1e-5
    ft.save_adapter(model, tmp_path / "again")
    assert file_keys(tmp_path / "again") == file_keys(tmp_path)


# --- bad input ----------------------------------------------------------------------------------

def test_an_encoder_is_refused_by_name():
    with pytest.raises(ConfigError, match="BertForSequenceClassification.*bidirectional.*prompt tuning"):
        ft.attach(tiny_bert(seed=0), PrefixTuningConfig())


def test_invalid_config_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        PrefixTuningConfig(num_virtual_tokens=-1, prefix_projection="yes", encoder_hidden_size=0,
                           modules_to_save=[""])
    assert len(caught.value.problems) == 4, caught.value.problems
    with pytest.raises(ConfigError, match="only used with prefix_projection"):
        PrefixTuningConfig(encoder_hidden_size=8)


def test_mixed_batch_is_refused():
    model = ft.attach(tiny_llama(seed=0), PrefixTuningConfig(num_virtual_tokens=N))
    with pytest.raises(ConfigError, match="mixed batch"):
        model(input_ids=batch()[0], adapter_names=["default", "__base__"])


def test_an_mlp_adapter_cannot_be_restored_from_its_folded_file():
    model = ft.attach(tiny_llama(seed=0), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    with pytest.raises(UnsupportedAdapterError, match="cannot be rebuilt"):
        restore_tensors(model, "default", adapter_file_tensors(model, "default"), "checkpoint")


def test_decoding_without_positions_matches_given_positions():
    """A decode step with no position_ids places the token where the given positions do."""
    _, model = attached("gpt2")
    ids, mask = batch(padded=False)
    first = model(input_ids=ids[:, :-1], use_cache=True)
    step = model(input_ids=ids[:, -1:], cache=first.cache).logits
    full = model(input_ids=ids, position_ids=mask_positions(mask)).logits[:, -1:]
    assert (step - full).abs().max() < 1e-10
