"""WiSE-FT interpolation, full fine-tuning's model directory and LP-FT, through the API and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import logits_of, random_ids, tiny_bert, tiny_llama
from runs import make_workspace, sst2_slice
from safetensors.torch import load_file

import feathertune as ft
from feathertune.adapters import adapter_parameters
from feathertune.cli import main as cli
from feathertune.interpolation import interpolate


@torch.no_grad()
def randomised(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, name):
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def plain(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [ft.LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"]),
                                    ft.PartialConfig(top_blocks=1), ft.IA3Config()],
                         ids=["lora", "partial", "ia3"])
def test_alpha_0_is_the_base_1_the_merge_and_half_the_midpoint(config):
    base = plain(tiny_llama())
    model = randomised(ft.attach(tiny_llama(), config))
    tuned = plain(ft.merge(copy.deepcopy(model)))
    at = {alpha: plain(interpolate(model, alpha)) for alpha in (0.0, 0.5, 1.0)}
    assert at[0.0].keys() == base.keys() == tuned.keys()
    assert all(torch.equal(at[0.0][k], base[k]) for k in base), "α = 0 must be the base exactly"
    assert all(torch.equal(at[1.0][k], tuned[k]) for k in base), "α = 1 must be the merged fine-tune exactly"
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    for k in base:
        assert torch.allclose(at[0.5][k], (base[k] + tuned[k]) / 2, atol=1e-7, rtol=0), k
    assert not any(type(m).__module__.startswith("feathertune") for m in interpolate(model, 0.5).modules())
    ids = random_ids()
    assert torch.allclose(logits_of(interpolate(model, 1.0), ids), logits_of(model, ids), atol=1e-5)


def test_a_plain_full_fine_tune_interpolates_against_its_base():
    base = tiny_bert()
    tuned = tiny_bert(seed=1)  # stands in for a full fine-tune of the same architecture
    half = interpolate(tuned, 0.25, base=base)
    b, t, h = plain(base), plain(tuned), plain(half)
    for k, v in h.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * b[k] + 0.25 * t[k], atol=1e-7, rtol=0), k
    assert plain(tuned).keys() == t.keys() and all(torch.equal(plain(tuned)[k], t[k]) for k in t), "inputs untouched"


def test_interpolate_refuses_what_it_cannot_interpolate():
    with pytest.raises(ft.ConfigError, match="cannot be merged"):
        interpolate(ft.attach(tiny_llama(), ft.BottleneckConfig()), 0.5)
    with pytest.raises(ft.ConfigError, match="pass base=<the original model>"):
        interpolate(tiny_llama(), 0.5)
    with pytest.raises(ft.ConfigError, match="do not have the same tensors"):
        interpolate(tiny_llama(), 0.5, base=tiny_bert())
    with pytest.raises(ft.ConfigError, match="alpha=nan must be a finite number"):
        interpolate(ft.attach(tiny_llama(), ft.LoraConfig()), float("nan"))


# --- through the pipeline and the CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("wise"))


def small_run(root, config, name, **changes):
    values = {**config, "train": {**config["train"], "max_steps": 2, "checkpoint_every": 0}, **changes}
    out = root / "runs" / name
    ft.run(ft.TrainConfig.from_dict({**values, "output": str(out)}), log=lambda *_: None)
    return out


def test_cli_interpolate_writes_a_directory_transformers_loads_with_the_same_logits(workspace, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root, config = workspace
    run = small_run(root, config, "lora")
    out = tmp_path / "half"
    assert cli(["interpolate", str(run), "--alpha", "0.5", "--out", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = ft.load_model(config["model"])
    expected = interpolate(ft.load_adapter(model, run / "adapter"), 0.5)
    ids = random_ids(2, 12) % reloaded.config.vocab_size
    assert torch.allclose(logits_of(reloaded, ids), logits_of(expected, ids), atol=1e-5)
    assert cli(["interpolate", str(run), "--alpha", "0.5", "--out", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_cli_eval_scores_each_alpha_and_plots_the_curve(workspace, capsys):
    root, config = workspace
    run = small_run(root, config, "lora-eval")
    capsys.readouterr()
    assert cli(["eval", str(run), "--alpha", "0,0.5,1"]) == 0
    results = json.loads(capsys.readouterr().out)
    points = results["interpolation"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    assert all({"loss", "bleu"} <= set(p) for p in points)
    eval_json = json.loads((run / "eval.json").read_text())
    assert points[0]["loss"] == pytest.approx(eval_json["base_eval_loss"], abs=1e-5)
    assert points[-1]["loss"] == pytest.approx(eval_json["eval_loss"], abs=1e-4)
    assert (run / "wise_ft-validation.png").read_bytes()[:4] == b"\x89PNG"


def test_a_full_fine_tune_writes_a_model_directory(workspace):
    from transformers import AutoModelForCausalLM

    root, config = workspace
    values = {k: v for k, v in config.items() if k != "lora"}
    run = small_run(root, values, "full", method="full", adapter={})
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    model, _ = ft.load_model(config["model"])
    ft.load_adapter(model, run / "adapter")
    ids = random_ids(2, 12) % reloaded.config.vocab_size
    assert torch.allclose(logits_of(reloaded, ids), logits_of(model, ids), atol=1e-5)
    with ft.disabled(model):
        assert not torch.allclose(logits_of(model, ids), logits_of(reloaded, ids), atol=1e-4), "it trained"


def test_lp_ft_trains_only_the_head_for_the_first_steps(workspace):
    root, _ = workspace
    train, dev = sst2_slice(root)
    out = root / "runs" / "lp-ft"
    ft.run(ft.TrainConfig.from_dict({
        "model": "minilm-l6", "output": str(out),
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": str(train), "validation": str(dev), "max_length": 32},
        "train": {"max_steps": 3, "lp_steps": 2, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0,
                  "checkpoint_every": 1, "keep_checkpoints": 5},
        "eval": {"compare_base": False},
    }), log=lambda *_: None)
    steps = [load_file(str(out / "checkpoints" / f"step-{s:06d}" / "adapter" / "adapter_model.safetensors"))
             for s in (1, 2)] + [load_file(str(out / "adapter" / "adapter_model.safetensors"))]
    head = {k for k in steps[0] if ".classifier." in k}
    rest = set(steps[0]) - head
    assert head and rest
    assert all(not steps[0][k].any() for k in rest if "lora_B" in k), "LoRA's B starts at zero and stays there"
    assert all(torch.equal(steps[0][k], steps[1][k]) for k in rest), "probe steps changed more than the head"
    assert any(not torch.equal(steps[0][k], steps[1][k]) for k in head), "the head should train from step 1"
    assert any(not torch.equal(steps[1][k], steps[2][k]) for k in rest if "lora_B" in k), "then LoRA trains"


def test_lp_steps_on_a_causal_lm_is_refused(workspace, capsys):
    root, config = workspace
    assert cli(["train", f"model={config['model']}", f"data.train={root / 'train.jsonl'}", "train.lp_steps=2",
                f"output={root / 'runs' / 'lp-causal'}"]) == 2
    assert "a causal LM has none" in capsys.readouterr().err
