"""Round trips with Hugging Face PEFT, both ways: files feathertune writes load in PEFT with the same
outputs, and files PEFT writes load in feathertune with the same outputs.

For every case the two libraries must agree on
- the logits (float32, eval mode, dropout 0, non-zero adapters) to 1e-5,
- the set of modules that carry LoRA (and the set of modules_to_save),
- the tensor names in adapter_model.safetensors,
and PEFT must load feathertune's file without missing or unexpected keys.

`peft` is a test-only dependency: the module is skipped without it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from typing import Any

import pytest
import torch
from safetensors import safe_open

import feathertune as ft
from feathertune.methods.lora import LoraLayer as FtLoraLayer
from feathertune.saved_modules import ModulesToSave
from feathertune.wrapping import wrapped_layers
from models import BUILDERS, inputs_for, output_of

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict  # noqa: E402

# PEFT calls a transformers method that transformers 5 deprecates; nothing to do with feathertune.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PREFIX = "base_model.model."
ATOL = 1e-5
WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass
class Case:
    id: str
    model: str  # key of models.BUILDERS
    ft: dict[str, Any]  # feathertune LoraConfig kwargs (dropout 0 is added)
    peft_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # PEFT-only LoraConfig kwargs
    peft_can_build: bool = True  # False: PEFT has no config that builds the same adapter (PiSSA export)

    def ft_config(self) -> ft.LoraConfig:
        return ft.LoraConfig(dropout=0.0, **self.ft)

    def peft_config(self) -> peft.LoraConfig:
        """The PEFT LoraConfig that means the same as `ft_config`."""
        names = {"alpha": "lora_alpha", "layers": "layers_to_transform"}
        kwargs = {names.get(k, k): v for k, v in self.ft.items()}
        return peft.LoraConfig(lora_dropout=0.0, **kwargs, **self.peft_extra)


QV = ["q_proj", "v_proj"]
CASES = [
    Case("lora-llama", "llama", dict(r=4, alpha=8, target_modules=QV)),
    Case("rslora-llama", "llama", dict(r=4, alpha=6, target_modules=QV, use_rslora=True)),
    Case("dora-llama", "llama", dict(r=4, alpha=8, target_modules=QV, use_dora=True)),
    Case("dora-gpt2-conv1d", "gpt2", dict(r=4, alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True),
         peft_extra=dict(fan_in_fan_out=True)),
    Case("lora-cnn-conv2d", "cnn", dict(r=2, alpha=4, target_modules=["conv1", "conv2"])),
    Case("dora-cnn-conv2d", "cnn", dict(r=2, alpha=4, target_modules=["conv1", "conv2", "head"], use_dora=True)),
    Case("lora-llama-embedding", "llama", dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])),
    Case("modules-to-save-bert", "bert", dict(r=4, alpha=8, target_modules=["query", "value"],
                                              modules_to_save=["classifier"])),
    Case("rank-alpha-pattern-llama", "llama", dict(r=4, alpha=8, target_modules=QV,
                                                   rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    Case("layers-llama", "llama", dict(r=4, alpha=8, target_modules=QV, layers=[1])),
    Case("all-linear-llama", "llama", dict(r=2, alpha=4, target_modules="all-linear")),
    Case("bias-lora-only-bert", "bert", dict(r=4, alpha=8, target_modules=["query", "value"], bias="lora_only")),
    # Beyond the basics: combinations whose scale or layout is easy to get wrong.
    Case("rslora-patterns-llama", "llama", dict(r=4, alpha=6, target_modules=QV, use_rslora=True,
                                                rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    Case("dora-bias-cnn-conv2d", "cnn", dict(r=2, alpha=4, target_modules=["conv1", "conv2"], use_dora=True,
                                             bias="lora_only")),
    Case("all-linear-gpt2-conv1d", "gpt2", dict(r=2, alpha=4, target_modules="all-linear"),
         peft_extra=dict(fan_in_fan_out=True)),
    Case("embedding-padding-idx-bert", "bert", dict(r=2, alpha=4, target_modules=["word_embeddings", "value"])),
    # PiSSA is exported as a plain rank-2r LoRA (the frozen start folded in), which PEFT loads as is.
    Case("pissa-export-llama", "llama", dict(r=2, alpha=4, target_modules=QV, init="pissa", use_rslora=True,
                                             rank_pattern={"v_proj": 3}), peft_can_build=False),
]
# PEFT → feathertune: the same, plus the sequence-classification task type once (PEFT then adds
# 'classifier' and 'score' to modules_to_save whatever the model has).
PEFT_CASES = [c for c in CASES if c.peft_can_build] + [
    Case("seq-cls-task-bert", "bert", dict(r=4, alpha=8, target_modules=["query", "value"]),
         peft_extra=dict(task_type="SEQ_CLS")),
    Case("seq-cls-all-linear-bert", "bert", dict(r=2, alpha=4, target_modules="all-linear"),
         peft_extra=dict(task_type="SEQ_CLS")),
    # B random from the start instead of perturbed zeros; the file says init_lora_weights=false.
    Case("init-false-llama", "llama", dict(r=4, alpha=8, target_modules=QV),
         peft_extra=dict(init_lora_weights=False)),
]


# --- helpers --------------------------------------------------------------------------------------

_BASES: dict[str, torch.nn.Module] = {}


def fresh_base(kind: str) -> torch.nn.Module:
    """A deep copy of the (cached) tiny base model of this kind; every copy has the same weights."""
    if kind not in _BASES:
        _BASES[kind] = BUILDERS[kind](seed=0)
    return copy.deepcopy(_BASES[kind]).eval()


@torch.no_grad()
def logits(model, kind: str) -> torch.Tensor:
    model.eval()
    return output_of(model, inputs_for(kind)).detach().clone()


@torch.no_grad()
def perturb(params, seed: int = 0) -> None:
    """Add N(0, 0.3²) noise to each parameter, so that every LoRA B (zero at init) is non-zero."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def file_keys(directory) -> set[str]:
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        return set(f.keys())


def ft_lora_modules(model) -> set[str]:
    return {n for n, layer in wrapped_layers(model) if isinstance(layer, FtLoraLayer)}


def ft_saved_modules(model) -> set[str]:
    return {n for n, layer in wrapped_layers(model) if isinstance(layer, ModulesToSave)}


def peft_lora_modules(peft_model) -> set[str]:
    return {n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLayer)}


def peft_saved_modules(peft_model) -> set[str]:
    return {n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def embedding_copies(keys: set[str]) -> set[str]:
    """PEFT's extra copy of a targeted embedding's base weight (save_embedding_layers='auto')."""
    return {k for k in keys if k.endswith(".base_layer.weight")
            and k.removesuffix("base_layer.weight") + "lora_embedding_A" in keys}


def read_file(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max |Δlogits| = {err:.3g} > {ATOL}"


def peft_from_pretrained(kind: str, directory):
    """PeftModel.from_pretrained on a fresh base, returning (model, warnings raised while loading)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(fresh_base(kind), str(directory))
    return model.eval(), [str(w.message) for w in caught]


def peft_saved(case: Case, directory, seed: int = 1):
    """A PEFT model with non-zero adapters for `case`, saved to `directory`; returns the model."""
    model = peft.get_peft_model(fresh_base(case.model), case.peft_config())
    if case.peft_extra.get("init_lora_weights", True) is not False:  # False: B is random already
        perturb([p for p in model.parameters() if p.requires_grad], seed=seed)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'Setting save_embedding_layers to True ...'
        model.save_pretrained(str(directory))
    return model


def ft_saved(case: Case, directory, seed: int = 0):
    model = ft.attach(fresh_base(case.model), case.ft_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    perturb(trainable, seed=seed)
    model.eval()
    ft.save_adapter(model, directory)
    return model


# --- feathertune → PEFT ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_feathertune_file_loads_in_peft(case: Case, tmp_path):
    model = ft_saved(case, tmp_path)
    base_out = logits(fresh_base(case.model), case.model)
    ft_out = logits(model, case.model)
    assert (ft_out - base_out).abs().max() > 100 * ATOL, "the adapter should change the outputs"

    # PEFT knows every key of the config (it would drop or refuse the others).
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(values) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}

    loaded, caught = peft_from_pretrained(case.model, tmp_path)
    assert not [w for w in caught if "missing" in w.lower() or "unexpected" in w.lower()], caught

    # Same modules adapted and saved.
    assert peft_lora_modules(loaded) == ft_lora_modules(model)
    assert peft_saved_modules(loaded) == ft_saved_modules(model)

    # Every tensor in the file found its place in PEFT (none unexpected), and PEFT has none the
    # file lacks (none missing): what PEFT would save now is exactly the file, value for value.
    ours = read_file(tmp_path)
    theirs = get_peft_model_state_dict(loaded, save_embedding_layers=False)
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key

    assert_close(logits(loaded, case.model), ft_out, "PEFT vs feathertune")


# --- PEFT → feathertune ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: c.id)
def test_peft_file_loads_in_feathertune(case: Case, tmp_path):
    peft_model = peft_saved(case, tmp_path / "peft")
    peft_out = logits(peft_model, case.model)
    base_out = logits(fresh_base(case.model), case.model)
    assert (peft_out - base_out).abs().max() > 100 * ATOL, "the adapter should change the outputs"
    theirs = read_file(tmp_path / "peft")
    if "embed_tokens" in case.ft["target_modules"]:  # one of PEFT's EMBEDDING_LAYER_NAMES
        assert embedding_copies(set(theirs)), "PEFT should have saved the embedding's base weight too"

    model = ft.load_adapter(fresh_base(case.model), tmp_path / "peft")
    assert ft_lora_modules(model) == peft_lora_modules(peft_model)
    assert ft_saved_modules(model) == peft_saved_modules(peft_model)
    assert not any(p.requires_grad for p in model.parameters())
    assert_close(logits(model, case.model), peft_out, "feathertune vs PEFT")

    # Saved again by feathertune: the same tensors under the same names (less the embedding copy).
    ft.save_adapter(model, tmp_path / "again")
    again = read_file(tmp_path / "again")
    assert set(again) == set(theirs) - embedding_copies(set(theirs))
    for key, tensor in again.items():
        assert torch.equal(tensor, theirs[key]), key


# --- the files themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c.peft_can_build], ids=lambda c: c.id)
def test_tensor_names_match_peft(case: Case, tmp_path):
    """The same config on the same model: feathertune's file has exactly PEFT's tensor names."""
    ft_saved(case, tmp_path / "ft")
    peft_saved(case, tmp_path / "peft")
    ours, theirs = file_keys(tmp_path / "ft"), file_keys(tmp_path / "peft")
    # PEFT also saves a copy of a targeted embedding's base weight; feathertune has no need to.
    assert ours == theirs - embedding_copies(theirs)
    with safe_open(str(tmp_path / "ft" / WEIGHTS), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and PEFT expect of a torch file


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("dora-llama", "modules-to-save-bert")],
                         ids=lambda c: c.id)
def test_adapter_config_json_has_peft_keys(case: Case, tmp_path):
    ft_saved(case, tmp_path)
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "LORA"
    assert values["r"] == case.ft["r"]
    assert values["lora_alpha"] == case.ft["alpha"]
    assert sorted(values["target_modules"]) == sorted(case.ft["target_modules"])
    assert values["use_dora"] is case.ft.get("use_dora", False)
    assert values["use_rslora"] is case.ft.get("use_rslora", False)
    assert values["lora_dropout"] == 0.0
    assert values["bias"] == "none"
    assert (values["modules_to_save"] or []) == case.ft.get("modules_to_save", [])
    # SEQ_CLS tells PEFT the head is saved with the adapter: only when it is.
    head_saved = "classifier" in case.ft.get("modules_to_save", [])
    assert values["task_type"] == {"llama": "CAUSAL_LM", "bert": "SEQ_CLS" if head_saved else None}.get(case.model)
    # PEFT parses it into the same config.
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", case.ft["r"], case.ft["alpha"])
    assert set(config.target_modules) == set(case.ft["target_modules"])
    assert (config.use_dora, config.use_rslora) == (values["use_dora"], values["use_rslora"])
    # And it is the config that PEFT itself writes for this adapter, on every key that matters.
    peft_dir = tmp_path / "peft"
    peft_saved(case, peft_dir)
    written = json.loads((peft_dir / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias", "fan_in_fan_out",
                "layers_to_transform", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert values[key] == written[key], key
    assert set(values["target_modules"]) == set(written["target_modules"])
    assert set(values["modules_to_save"] or []) == set(written["modules_to_save"] or [])


def test_one_of_several_adapters_saves_and_loads(tmp_path):
    """save_adapter(name=...) writes only that adapter; PEFT and feathertune (under another name,
    trainable) load it with the outputs it has alone."""
    model = fresh_base("llama")
    ft.attach(model, ft.LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]), name="first")
    ft.attach(model, ft.LoraConfig(r=3, alpha=5, dropout=0.0, target_modules=["v_proj", "o_proj"]),
              name="second")
    perturb([p for n, p in model.named_parameters() if ".lora." in n])
    ft.set_active(model, "second")
    expected = logits(model, "llama")
    ft.save_adapter(model, tmp_path, name="second")
    keys = file_keys(tmp_path)
    assert keys and not any("q_proj" in k for k in keys)

    loaded, caught = peft_from_pretrained("llama", tmp_path)
    assert not [w for w in caught if "missing" in w.lower()], caught
    assert peft_lora_modules(loaded) == {n for n in ft_lora_modules(model) if "q_proj" not in n}
    assert_close(logits(loaded, "llama"), expected, "PEFT vs feathertune")

    again = ft.load_adapter(fresh_base("llama"), tmp_path, name="mine", trainable=True)
    assert_close(logits(again, "llama"), expected, "reloaded vs saved")
    trainable = sum(p.numel() for p in again.parameters() if p.requires_grad)
    assert trainable == sum(t.numel() for t in read_file(tmp_path).values())
