"""Error paths: every mistake raises a feathertune error that says what was given, what is allowed
and how to fix it, and a failed operation leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import VOCAB, inputs_for, output_of, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import feathertune as ft
from feathertune.wrapping import WrappedLayer

STATE = "_feathertune"


# --- helpers -------------------------------------------------------------------------------------

def message_of(excinfo) -> str:
    return str(excinfo.value)


def wrappers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, WrappedLayer)]


def snapshot(model: nn.Module, kind: str = "llama") -> dict:
    """What must not change when an operation fails: module tree, parameters, output, state."""
    with torch.no_grad():
        out = output_of(model, inputs_for(kind)).clone()
    state = model.__dict__.get(STATE)
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "output": out,
        "hooks": len(model._forward_pre_hooks),
        "configs": None if state is None else list(state.configs),
        "active": None if state is None else list(state.active),
    }


def assert_unchanged(model: nn.Module, before: dict, kind: str = "llama") -> None:
    after = snapshot(model, kind)
    assert after["modules"] == before["modules"], "a failed operation left modules wrapped/replaced"
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad) in before["params"].items():
        assert torch.equal(after["params"][name][0], value), f"{name} changed"
        assert after["params"][name][1] == grad, f"{name}.requires_grad changed"
    assert after["hooks"] == before["hooks"], "a failed operation left a forward hook behind"
    assert after["configs"] == before["configs"]
    assert after["active"] == before["active"], (
        f"active adapters changed from {before['active']} to {after['active']}")
    assert torch.equal(after["output"], before["output"]), "output differs after a failed operation"


def llama_with_hidden(hidden: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def edited_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of adapter directory `src` whose adapter_config.json has `changes` applied."""
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values, indent=2))
    return dst


# --- saved adapters shared by the loading tests (built once) -------------------------------------

@pytest.fixture(scope="module")
def ft_adapter_dir(tmp_path_factory) -> Path:
    """A LoRA adapter saved by feathertune from tiny_llama (hidden 32) on q_proj and v_proj."""
    model = ft.attach(tiny_llama(), ft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return ft.save_adapter(model, tmp_path_factory.mktemp("ft_adapter"))


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter saved by PEFT itself (all its config keys), and PEFT's output with it."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        expected = output_of(model, inputs_for("llama")).clone()
    directory = tmp_path_factory.mktemp("peft_lora")
    model.save_pretrained(str(directory))
    return directory, expected


@pytest.fixture(scope="module")
def peft_loha_dir(tmp_path_factory) -> Path:
    """A PEFT adapter of a type feathertune lacks (LoHa: Hadamard products of low-rank factors)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoHaConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    directory = tmp_path_factory.mktemp("peft_loha")
    model.save_pretrained(str(directory))
    return directory


# --- LoraConfig validation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, given, allowed", [
    ({"r": 0}, "r=0", ["positive integer"]),
    ({"r": -1}, "r=-1", ["positive integer"]),
    ({"alpha": 0}, "alpha=0", ["positive"]),
    ({"dropout": 1.5}, "dropout=1.5", ["[0, 1)"]),
    ({"bias": "all"}, "bias='all'", ["none", "lora_only"]),
    ({"init": "foo"}, "init='foo'", ["default", "gaussian", "pissa"]),
])
def test_invalid_lora_config_value(kwargs, given, allowed):
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.LoraConfig(**kwargs)
    message = message_of(excinfo)
    assert isinstance(excinfo.value, ValueError)  # ConfigError is also a ValueError
    assert excinfo.value.problems and len(excinfo.value.problems) == 1
    assert "LoraConfig" in message
    assert given in message
    for word in allowed:
        assert word in message


def test_every_config_problem_is_listed_in_one_error():
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.LoraConfig(r=0, dropout=2, bias="x")
    problems = excinfo.value.problems
    message = message_of(excinfo)
    assert len(problems) == 3, problems
    assert "3 problems" in message
    for given in ("r=0", "dropout=2", "bias='x'"):
        assert given in message
        assert sum(given in p for p in problems) == 1


@pytest.mark.parametrize("kwargs, given", [
    ({"rank_pattern": "q_proj"}, "rank_pattern"),
    ({"alpha_pattern": [1]}, "alpha_pattern"),
])
def test_pattern_of_wrong_type_is_a_config_error(kwargs, given):
    """A pattern that is not a dict must be reported as such, not crash inside dict()."""
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.LoraConfig(**kwargs)
    message = message_of(excinfo)
    assert given in message
    assert "dict" in message or "mapping" in message


# --- LoraConfig.from_dict: unknown keys ----------------------------------------------------------

@pytest.mark.parametrize("typo", ["rnak", "rank"])
def test_from_dict_unknown_key_suggests_the_rank_field(typo):
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.LoraConfig.from_dict({"r": 8, typo: 4})
    message = message_of(excinfo)
    assert repr(typo) in message
    assert "did you mean" in message
    assert "'r'" in message.split("did you mean", 1)[1] or "'rank_pattern'" in message.split("did you mean", 1)[1]
    assert "known keys are" in message and "rank_pattern" in message


def test_from_dict_reports_unknown_keys_and_bad_values_together():
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.LoraConfig.from_dict({"r": 0, "target_module": ["q_proj"]})
    message = message_of(excinfo)
    assert len(excinfo.value.problems) == 2
    assert "'target_module'" in message and "did you mean 'target_modules'" in message
    assert "r=0" in message


# --- targeting -----------------------------------------------------------------------------------

def test_target_typo_names_it_lists_modules_and_suggests():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ft.TargetError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["qproj"]))
    assert isinstance(excinfo.value, ft.ConfigError)
    message = message_of(excinfo)
    assert "'qproj'" in message
    assert "matched no module" in message
    for existing in ("q_proj", "k_proj", "v_proj"):
        assert existing in message
    assert "did you mean q_proj" in message
    assert_unchanged(model, before)


def test_target_of_unsupported_type_names_type_and_supported_types():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ft.TargetError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["input_layernorm"]))
    message = message_of(excinfo)
    assert "input_layernorm" in message
    assert "LlamaRMSNorm" in message
    assert "nn.Linear" in message and "nn.Embedding" in message
    assert "supported" in message
    assert_unchanged(model, before)


def test_layers_out_of_range_lists_existing_block_indices():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ft.TargetError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["q_proj"], layers=[7]))
    message = message_of(excinfo)
    assert "layers=[7]" in message
    assert "block indices in this model: 0..1" in message
    assert_unchanged(model, before)


def test_modules_to_save_typo_names_it():
    model = tiny_bert()
    before = snapshot(model, "bert")
    with pytest.raises(ft.TargetError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))
    message = message_of(excinfo)
    assert "modules_to_save=['clasifier']" in message
    assert "matched no module" in message
    assert "classifier" in message.replace("'clasifier'", "")  # the real name is offered
    # The header must not blame target_modules for a modules_to_save problem.
    assert "target_modules has" not in message
    assert_unchanged(model, before, "bert")


def test_failed_attach_leaves_model_unchanged():
    """modules_to_save is wrapped before target_modules is resolved; a target error must undo it."""
    model = tiny_bert()
    before = snapshot(model, "bert")
    with pytest.raises(ft.TargetError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["qury"], modules_to_save=["classifier"]))
    message = message_of(excinfo)
    assert "did you mean query" in message
    assert wrappers(model) == [], f"wrappers left behind: {wrappers(model)}"
    assert_unchanged(model, before, "bert")
    # The listed "modules that exist" must be the model's, not a half-built wrapper's internals.
    listed = message.split("modules that exist include", 1)[1].split("(did you mean", 1)[0]
    names = {n.strip(" …") for n in listed.split(",")}
    assert not names & {"base", "default"}, f"wrapper internals listed as modules: {sorted(names)}"


# --- adapter names -------------------------------------------------------------------------------

def test_attaching_the_same_name_twice():
    model = ft.attach(tiny_llama(), ft.LoraConfig(target_modules=["q_proj"]), name="mine")
    before = snapshot(model)
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.attach(model, ft.LoraConfig(target_modules=["v_proj"]), name="mine")
    message = message_of(excinfo)
    assert "'mine'" in message
    assert "already attached" in message
    assert "delete_adapter" in message or "another name" in message
    assert_unchanged(model, before)


def test_set_active_unknown_name_lists_attached():
    model = ft.attach(tiny_llama(), ft.LoraConfig(target_modules=["q_proj"]), name="first")
    ft.attach(model, ft.LoraConfig(target_modules=["v_proj"]), name="second")
    before = snapshot(model)
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.set_active(model, ["nope"])
    message = message_of(excinfo)
    assert "nope" in message
    assert "first" in message and "second" in message
    assert_unchanged(model, before)


def test_save_adapter_ambiguous_name(tmp_path):
    model = ft.attach(tiny_llama(), ft.LoraConfig(target_modules=["q_proj"]), name="a")
    ft.attach(model, ft.LoraConfig(target_modules=["v_proj"]), name="b")
    ft.set_active(model, ["a", "b"])
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.save_adapter(model, tmp_path / "out")
    message = message_of(excinfo)
    assert "a, b" in message
    assert "name=" in message
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    # and with name= it works
    ft.save_adapter(model, tmp_path / "out", name="b")
    assert (tmp_path / "out" / "adapter_config.json").is_file()


# --- loading onto the wrong base -----------------------------------------------------------------

def test_load_onto_other_hidden_size_names_tensors_and_both_shapes(ft_adapter_dir):
    model = llama_with_hidden(48)
    before = snapshot(model)
    with pytest.raises(ft.AdapterMismatchError) as excinfo:
        ft.load_adapter(model, ft_adapter_dir)
    message = message_of(excinfo)
    assert "adapter_model.safetensors" in message
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(8, 32)" in message and "(8, 48)" in message  # the file's shape and this model's
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert "(16, 8)" in message and "(24, 8)" in message
    assert wrappers(model) == []
    assert STATE not in model.__dict__
    assert_unchanged(model, before)


def test_load_onto_other_architecture_names_unplaced_tensors(ft_adapter_dir):
    model = tiny_gpt2()
    before = snapshot(model, "gpt2")
    with pytest.raises(ft.AdapterMismatchError) as excinfo:
        ft.load_adapter(model, ft_adapter_dir)
    message = message_of(excinfo)
    assert "base_model.model.model.layers.0.self_attn.q_proj" in message
    assert "base_model.model.model.layers.1.self_attn.v_proj" in message
    assert "no module 'model.layers.0.self_attn.q_proj'" in message
    assert "another base model" in message
    assert wrappers(model) == []
    assert STATE not in model.__dict__
    assert_unchanged(model, before, "gpt2")


def test_failed_load_keeps_existing_adapters_as_they_were(ft_adapter_dir):
    """A failed load must not deactivate (or otherwise touch) the adapters already on the model."""
    model = ft.attach(llama_with_hidden(48), ft.LoraConfig(target_modules=["k_proj"], dropout=0.0), name="mine")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # make "mine" change the output
    before = snapshot(model)
    with pytest.raises(ft.AdapterMismatchError):
        ft.load_adapter(model, ft_adapter_dir, name="other")
    assert_unchanged(model, before)


# --- missing or unsafe files ---------------------------------------------------------------------

def test_load_from_directory_without_config(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    model = tiny_llama()
    with pytest.raises(FileNotFoundError) as excinfo:
        ft.load_adapter(model, tmp_path)
    message = message_of(excinfo)
    assert str(tmp_path / "adapter_config.json") in message
    assert "missing" in message
    assert wrappers(model) == []


def test_load_from_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        ft.load_adapter(tiny_llama(), tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message_of(excinfo)


def test_load_pickle_only_directory_is_refused(ft_adapter_dir, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(ft_adapter_dir / "adapter_config.json", directory)
    (directory / "adapter_model.bin").write_bytes(b"not really a pickle")
    model = tiny_llama()
    with pytest.raises(FileNotFoundError) as excinfo:
        ft.load_adapter(model, directory)
    message = message_of(excinfo)
    assert str(directory / "adapter_model.safetensors") in message
    assert "adapter_model.bin" in message
    assert "pickle" in message and "never loads" in message
    assert "safetensors" in message
    assert wrappers(model) == []


def test_malformed_config_json_names_file_and_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{\n  "r": 8,\n  "peft_type": "LORA"\n  "lora_alpha": 16\n}\n')
    model = tiny_llama()
    with pytest.raises(ft.FeathertuneError) as excinfo:
        ft.load_adapter(model, tmp_path)
    message = message_of(excinfo)
    assert f"{tmp_path / 'adapter_config.json'}:4" in message
    assert "not valid JSON" in message
    assert wrappers(model) == []


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]\n")
    with pytest.raises(ft.FeathertuneError) as excinfo:
        ft.load_adapter(tiny_llama(), tmp_path)
    message = message_of(excinfo)
    assert "adapter_config.json" in message
    assert "JSON object" in message and "list" in message


# --- PEFT adapters feathertune must refuse -------------------------------------------------------

def test_peft_adapter_of_a_type_feathertune_lacks_is_refused_by_name(peft_loha_dir):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ft.UnsupportedAdapterError) as excinfo:
        ft.load_adapter(model, peft_loha_dir)
    message = message_of(excinfo)
    assert "peft_type='LOHA'" in message
    from feathertune.registry import METHODS
    assert all(repr(spec.peft_type) in message for spec in METHODS.values()), message
    assert "adapter_config.json" in message
    assert_unchanged(model, before)


@pytest.mark.parametrize("key, value, expected", [
    ("layer_replication", [[0, 1], [0, 2]], ["layer_replication=[[0, 1], [0, 2]]", "None"]),
    ("foo_scaling", 2.0, ["foo_scaling=2.0", "does not know"]),
    ("lora_bias", True, ["lora_bias=True", "False"]),
    ("init_lora_weights", "pissa", ["init_lora_weights='pissa'", "rewrites the base weights",
                                    "path_initial_model_for_weight_conversion"]),
    ("use_qalora", True, ["use_qalora=True", "False"]),
    ("bias", "all", ["bias='all'", "'none'", "'lora_only'"]),
])
def test_unsupported_peft_lora_feature_is_refused(peft_lora, tmp_path, key, value, expected):
    directory = edited_copy(peft_lora[0], tmp_path / "edited", **{key: value})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ft.UnsupportedAdapterError) as excinfo:
        ft.load_adapter(model, directory)
    message = message_of(excinfo)
    assert str(directory / "adapter_config.json") in message
    assert "not loaded" in message
    for text in expected:
        assert text in message
    assert_unchanged(model, before)


def test_several_unsupported_features_are_listed_together(peft_lora, tmp_path):
    directory = edited_copy(peft_lora[0], tmp_path / "edited", lora_bias=True, use_qalora=True, bias="all")
    with pytest.raises(ft.UnsupportedAdapterError) as excinfo:
        ft.load_adapter(tiny_llama(), directory)
    message = message_of(excinfo)
    for text in ("lora_bias=True", "use_qalora=True", "bias='all'"):
        assert text in message


def test_unknown_peft_key_with_null_value_is_accepted(peft_lora, tmp_path):
    source, expected = peft_lora
    directory = edited_copy(source, tmp_path / "edited", foo_scaling=None)
    model = ft.load_adapter(tiny_llama(), directory)
    with torch.no_grad():
        out = output_of(model, inputs_for("llama"))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, output_of(tiny_llama(), inputs_for("llama")))


def test_loading_under_a_taken_name_is_refused(ft_adapter_dir):
    model = ft.load_adapter(tiny_llama(), ft_adapter_dir, name="x")
    model.eval()  # the adapter's dropout modules are created in training mode (reported separately)
    before = snapshot(model)
    with pytest.raises(ft.ConfigError) as excinfo:
        ft.load_adapter(model, ft_adapter_dir, name="x")
    assert "'x'" in message_of(excinfo) and "already attached" in message_of(excinfo)
    assert_unchanged(model, before)
