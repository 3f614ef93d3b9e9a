"""QLoRA: the LoRA contract over a frozen NF4 base (bitsandbytes, on the CPU here).

Merging into a 4-bit base re-quantizes W + s·B·A, so merged-vs-unmerged and unmerge can only be
as exact as NF4 rounding allows. The tolerances used below are measured, not guessed: each model is
compared with the same weights computed in full precision and quantized by bitsandbytes afresh,
and `rounding` (how far that quantization moves the merged model's output) sets the slack.
"""

from __future__ import annotations

import copy

import pytest
import torch

import feathertune as ft
from models import inputs_for, output_of, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from feathertune import quant  # noqa: E402

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def quantized_llama():
    return quant.quantize(tiny_llama(), "nf4")


def attach(model, variant: str):
    config = ft.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS, **VARIANTS[variant])
    return ft.attach(model, config)


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def exact_and_rounded_merge(model, inputs):
    """Outputs of the adapted model merged in full precision, and of that merged model quantized by
    bitsandbytes afresh: the reference for a merge into NF4, and the size of NF4's rounding."""
    exact = ft.merge(quant.dequantize_model(copy.deepcopy(model)))
    rounded = quant.quantize(copy.deepcopy(exact), "nf4")
    with torch.no_grad():
        return output_of(exact, inputs), output_of(rounded, inputs)


def carried_and_rounded_unmerge(merged, inputs):
    """Outputs (adapters off) of the NF4-merged model unmerged in full precision, and of that unmerged
    model quantized by bitsandbytes afresh: the reference for an unmerge out of NF4. The first is
    the base with the merge's rounding carried back through the inverse (see the test)."""
    carried = ft.unmerge(quant.dequantize_model(copy.deepcopy(merged)))
    rounded = quant.quantize(copy.deepcopy(carried), "nf4")
    with torch.no_grad(), ft.disabled(carried), ft.disabled(rounded):
        return output_of(carried, inputs), output_of(rounded, inputs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_contract_over_an_nf4_base(variant, tmp_path):
    base = quantized_llama()
    inputs = inputs_for("llama")
    with torch.no_grad():
        base_out = output_of(base, inputs)
    model = attach(copy.deepcopy(base), variant)
    wrapped = model.model.layers[0].self_attn.q_proj
    assert quant.is_quantized(wrapped.base), "LoRA must wrap the 4-bit layer itself"
    with torch.no_grad():
        assert (output_of(model, inputs) - base_out).abs().max() <= 1e-6  # zero-initialised B

    # One training step changes only the adapter: the packed 4-bit codes stay as they were.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    output_of(model, inputs).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-3

    # save -> load onto another NF4 copy of the same base: exactly the same outputs.
    ft.save_adapter(model, tmp_path)
    reloaded = ft.load_adapter(quantized_llama(), tmp_path)
    with torch.no_grad():
        assert (output_of(reloaded, inputs) - adapted).abs().max() <= 1e-6
        with ft.disabled(model):
            assert (output_of(model, inputs) - base_out).abs().max() <= 1e-6

    # merged vs unmerged: merging into NF4 is dequantize -> add -> requantize, so the merged model is
    # the full-precision merge rounded to NF4 (the same codes bitsandbytes gives it), and differs
    # from the unmerged model by exactly that rounding.
    exact, rounded = exact_and_rounded_merge(model, inputs)
    assert (exact - adapted).abs().max() <= 1e-5
    rounding = (rounded - exact).abs().max().item()
    with pytest.warns(UserWarning, match="NF4"):
        ft.merge(model, unload=False)
    with torch.no_grad():
        merged = output_of(model, inputs)
    assert (merged - rounded).abs().max() <= 0.05 * rounding + 1e-5
    assert (merged - adapted).abs().max() <= 1.5 * rounding
    codes = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    ft.merge(model, unload=False)  # merging twice is a no-op
    assert all(torch.equal(p, codes[n]) for n, p in model.named_parameters() if n in codes)
    # unmerge: W̃ = NF4((NF4(W') − c·Δ)/Π) = NF4(W + e/Π), where W' = Π·W + c·Δ is the merge, e =
    # NF4(W') − W' its rounding, and Π the row scale (1 for LoRA; DoRA's c = m/‖W + Δ‖). The rounding
    # stays behind, divided row by row by Π, and is rounded once more: the unmerged model is
    # bitsandbytes' quantization of the full-precision inverse of the NF4 merge, as exactly as the
    # merged model is bitsandbytes' quantization of the full-precision merge. Its distance to the base
    # has no bound in `rounding`: a DoRA row with m ≈ 0 (Π ≈ 0) is rebuilt from ≈ e/Π alone, and an
    # NF4 block (64 values, two rows of these 32-wide layers) that holds a row of small Π and one of
    # large Π rounds both on the large row's scale; even for Π = 1 the two roundings' effects on the
    # output can add to more than 2·rounding.
    carried, requantized = carried_and_rounded_unmerge(model, inputs)
    ft.unmerge(model)
    with torch.no_grad(), ft.disabled(model):
        unmerged = output_of(model, inputs)
    assert (carried - base_out).abs().max() > 0  # the merge's rounding does stay behind
    assert (unmerged - requantized).abs().max() <= 0.05 * rounding + 1e-5


def test_an_adapter_trained_over_nf4_loads_onto_the_full_precision_base(tmp_path):
    """The QLoRA promise: train over 4 bits, deploy on the original weights (PEFT format)."""
    peft = pytest.importorskip("peft")
    model = attach(quantized_llama(), "lora")
    perturb(model)
    ft.save_adapter(model, tmp_path)
    full = ft.load_adapter(tiny_llama(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    inputs = inputs_for("llama")
    with torch.no_grad():
        ours_out, theirs_out = output_of(full, inputs), output_of(theirs, inputs)
        assert (ours_out - theirs_out).abs().max() <= 1e-5
        # the 4-bit and full-precision models differ only by the base's rounding
        assert (output_of(model, inputs) - ours_out).abs().max() <= 0.5


def test_dequantize_then_merge_is_the_exact_export(tmp_path):
    model = attach(quantized_llama(), "dora")
    perturb(model)
    inputs = inputs_for("llama")
    with torch.no_grad():
        adapted = output_of(model, inputs)
    quant.dequantize_model(model)  # Linear4bit -> nn.Linear inside the wrappers
    with torch.no_grad():
        assert (output_of(model, inputs) - adapted).abs().max() <= 1e-5
    merged = ft.merge(model)
    assert not any(quant.is_quantized(m) for m in merged.modules())
    with torch.no_grad():
        assert (output_of(merged, inputs) - adapted).abs().max() <= 1e-5


def test_trainable_parameters_counts_the_unpacked_base():
    model = attach(quantized_llama(), "lora")
    trainable, total = ft.trainable_parameters(model)
    full = attach(tiny_llama(), "lora")
    assert (trainable, total) == ft.trainable_parameters(full)


def test_a_qlora_run_reports_memory_and_merges_both_ways(tmp_path, capsys):
    """method: qlora in the pipeline; paged optimizers on the CPU say that paging does not apply;
    `merge` rounds into NF4 while `merge --dequantize` writes the exact full-precision model."""
    from test_train import make_workspace, write_config

    from feathertune.cli import main as cli

    root, config = make_workspace(tmp_path)
    out = root / "runs" / "qlora"
    cfg = write_config(root, config, "qlora", output=str(out), method="qlora",
                       train={"max_steps": 2, "optimizer": "paged_adamw_8bit"})
    assert cli(["train", str(cfg)]) == 0
    err = capsys.readouterr()
    assert "paging applies to CUDA memory only" in err.out + err.err
    scores = __import__("json").loads((out / "eval.json").read_text())
    assert scores["quantize"] == "nf4" and scores["peak_memory_mib"] > 0
    from transformers import AutoModelForCausalLM

    assert cli(["merge", "--adapter", str(out), "--out", str(tmp_path / "exact"), "--dequantize"]) == 0
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "exact").eval()
    full = ft.load_adapter(ft.load_model(config["model"])[0], out / "adapter")
    ids = torch.tensor([[5, 9, 14, 20, 31]])
    with torch.no_grad():
        assert (exact(ids).logits - full(ids).logits).abs().max() <= 1e-4


def test_a_qlora_classifier_evaluates_as_trained(tmp_path, capsys):
    """A QLoRA classifier's head trains in full precision and is saved so; `feathertune eval` loads the
    base quantized again and must leave the head unquantized too, or the saved head would not fit."""
    import json

    from runs import sst2_slice, write_config
    from test_cli_runs import classification_config

    from feathertune.cli import main as cli

    sst2_slice(tmp_path)
    config = {**classification_config(tmp_path), "method": "qlora"}
    out = tmp_path / "run"
    assert cli(["train", str(write_config(tmp_path, config, "qlora-cls", output=str(out)))]) == 0
    trained = json.loads((out / "eval.json").read_text())
    capsys.readouterr()
    assert cli(["eval", str(out)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == trained["accuracy"]
