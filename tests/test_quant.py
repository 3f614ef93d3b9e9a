"""NF4 quantization (feathertune.quant): the contract on tiny models, and the numbers checked
against bitsandbytes' own quantize_4bit / dequantize_4bit."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from feathertune.errors import ConfigError
from feathertune.quant import (
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantize,
    quantized_bytes,
    requantize_weight_,
)
from models import inputs_for, output_of, small_cnn, tiny_gpt2, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

NF4_RELATIVE_ERROR = 0.1  # ‖dequant(W) − W‖ / ‖W‖ for Gaussian W is ~0.092 with blocks of 64
DECODER_LINEARS = {f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def linear_model(W: torch.Tensor, bias: bool = False) -> nn.Sequential:
    out_features, in_features = W.shape
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.data.copy_(W)
    return nn.Sequential(layer)


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if is_quantized(module)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- the numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_is_bitsandbytes_own(double_quant):
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))  # (out, in)
    layer = quantize(linear_model(W), double_quant=double_quant)[0]
    codes, state = bnb.functional.quantize_4bit(W, quant_type="nf4", compress_statistics=double_quant,
                                                blocksize=64)
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    assert layer.weight.compress_statistics is double_quant and layer.compute_dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, codes)  # same packed codes
    dequantized = dequantize_weight(layer)
    assert dequantized.shape == (128, 256) and dequantized.dtype == torch.float32
    assert torch.equal(dequantized, bnb.functional.dequantize_4bit(codes, state))
    error = relative(dequantized, W)
    print(f"NF4 relative error ‖dequant(W) − W‖/‖W‖ (double_quant={double_quant}): {error:.4f}")
    assert 0.05 < error < NF4_RELATIVE_ERROR  # 4 bits: not exact, but close


def test_quantized_forward_is_x_times_dequantized_weight():
    """Also on layers whose out_features is not a multiple of 32 (bitsandbytes' CPU repacking would
    assert there): the forward stays in the standard layout, exactly x·dequant(W)ᵀ + b."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    layer = quantize(linear_model(W, bias=True))[0]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.allclose(y, x @ dequantize_weight(layer).T + layer.bias, atol=1e-5)


# --- quantize ------------------------------------------------------------------------------------

def test_quantize_replaces_every_decoder_linear_and_nothing_else():
    model = tiny_llama()
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    embedding = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head
    assert quantize(model) is model
    assert quantized_names(model) == DECODER_LINEARS
    assert model.lm_head is head and type(head) is nn.Linear and not is_quantized(head)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not is_quantized(model) and not is_quantized(model.model.layers[0].mlp)
    with torch.no_grad():
        got = output_of(model, inputs)
    # 14 layers of 4-bit weights on a 2-layer random model: logits move, but stay close (measured 0.13).
    print(f"tiny Llama logits, NF4 vs fp32: relative error {relative(got, expected):.3f}")
    assert relative(got, expected) < 0.25


def test_quantize_keeps_biases_and_training_mode():
    model = linear_model(torch.randn(64, 64), bias=True).train()
    bias = model[0].bias
    quantize(model)
    assert model[0].bias is bias and model[0].training


def test_quantize_is_idempotent():
    model = quantize(tiny_llama())
    layers = {name: m for name, m in model.named_modules() if is_quantized(m)}
    codes = {name: m.weight.data.clone() for name, m in layers.items()}
    assert quantize(model) is model
    assert quantize(model, double_quant=False) is model  # already quantized: left as is
    for name, module in model.named_modules():
        if name in layers:
            assert module is layers[name] and torch.equal(module.weight.data, codes[name])


@pytest.mark.parametrize("skip, kept", [
    (["v_proj"], {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}),
    (["layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj"}),
    (["model.layers.0"], {n for n in DECODER_LINEARS if n.startswith("model.layers.0.")}),  # inside it too
])
def test_skip_modules_stay_full_precision(skip, kept):
    model = quantize(tiny_llama(), skip_modules=skip)
    assert quantized_names(model) == DECODER_LINEARS - kept
    assert all(type(model.get_submodule(name)) is nn.Linear for name in kept)


def test_quantized_model_backpropagates_to_its_inputs_only():
    """QLoRA trains through the frozen 4-bit layers: gradients reach the input, never the codes."""
    layer = quantize(linear_model(torch.randn(32, 64)))[0]
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, dequantize_weight(layer).sum(0).expand(4, -1), atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("kwargs, expected", [
    ({"method": "fp4"}, ["method='fp4' is not supported", "allowed: 'nf4'"]),
    ({"method": "NF4"}, ["method='NF4'", "did you mean 'nf4'?"]),
    ({"compute_dtype": "bfloat16"}, ["compute_dtype='bfloat16'", "use torch.bfloat16"]),
    ({"double_quant": "yes"}, ["double_quant='yes' must be True or False"]),
    ({"skip_modules": "v_proj"}, ["skip_modules='v_proj' must be a list", "['v_proj']"]),
    ({"skip_modules": ["v_prj"]}, ["entry 'v_prj' names no module", "did you mean 'v_proj'?"]),
])
def test_bad_arguments_are_named(kwargs, expected):
    model = tiny_llama()
    with pytest.raises(ConfigError) as error:
        quantize(model, **kwargs)
    assert all(text in str(error.value) for text in expected), str(error.value)
    assert not quantized_names(model)  # nothing was touched


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        quantize(tiny_llama(), "int8", double_quant=1, compute_dtype=torch.int8)
    assert len(error.value.problems) == 3


@pytest.mark.parametrize("build, skip, expected", [
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"],
     "all 15 nn.Linear layers are the output head (lm_head) or in skip_modules"),
    (tiny_gpt2, None, "all 1 nn.Linear layers are the output head (lm_head)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3)), None, "the model has no nn.Linear layer"),
    (lambda: nn.Linear(8, 8), None, "the model is itself one nn.Linear"),
])
def test_nothing_to_quantize_says_what_was_found(build, skip, expected):
    with pytest.raises(ConfigError) as error:
        quantize(build(), skip_modules=skip)
    assert expected in str(error.value), str(error.value)
    if build is tiny_gpt2:
        assert "Conv1D layers are not quantized (only nn.Linear is)" in str(error.value)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed.*pip install bitsandbytes"):
        quantize(small_cnn())
    assert not is_quantized(nn.Linear(2, 2))


def test_functions_on_a_float_layer_say_what_they_need():
    with pytest.raises(ConfigError, match="needs a 4-bit layer .* but got Linear; quantize the model first"):
        dequantize_weight(nn.Linear(4, 4))
    layer = quantize(linear_model(torch.randn(32, 64)))[0]
    with pytest.raises(ConfigError, match=r"shape \(64, 32\), but this layer is \(32, 64\)"):
        requantize_weight_(layer, torch.randn(64, 32))


# --- requantize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
def test_requantizing_the_dequantized_weight_is_a_fixed_point(double_quant):
    layer = quantize(linear_model(torch.randn(128, 256)), double_quant=double_quant)[0]
    codes, before = layer.weight.data.clone(), dequantize_weight(layer)
    requantize_weight_(layer, before)
    assert torch.equal(layer.weight.data, codes)
    # The 4-bit codes are unchanged; with double quantization the absmaxes are re-quantized to 8 bits
    # around a new mean, which moves the values by at most ~1e-4 of the largest weight.
    change = (dequantize_weight(layer) - before).abs().max() / before.abs().max()
    assert change <= (1e-3 if double_quant else 0.0)
    assert layer.weight.compress_statistics is double_quant and layer.weight.blocksize == 64
    assert layer.weight.quant_type == "nf4" and layer.quant_state is layer.weight.quant_state
    assert not layer.weight.requires_grad


def test_requantizing_w_plus_delta_moves_the_weights_by_delta():
    g = torch.Generator().manual_seed(3)
    layer = quantize(linear_model(torch.randn(128, 256, generator=g)))[0]
    W = dequantize_weight(layer)
    delta = torch.randn(128, 8, generator=g) @ torch.randn(8, 256, generator=g)  # a rank-8 update
    delta *= 0.5 * W.std() / delta.std()
    requantize_weight_(layer, W + delta)
    new = dequantize_weight(layer)
    codes, state = bnb.functional.quantize_4bit(W + delta, quant_type="nf4", compress_statistics=True, blocksize=64)
    assert torch.equal(new, bnb.functional.dequantize_4bit(codes, state))
    # What is left besides delta is NF4's rounding of W + delta (measured ~0.21 of ‖delta‖).
    assert (new - W - delta).norm() <= NF4_RELATIVE_ERROR * (W + delta).norm()
    assert torch.cosine_similarity((new - W).flatten(), delta.flatten(), dim=0) > 0.95


# --- dequantize_model ----------------------------------------------------------------------------

def test_dequantize_model_gives_plain_linears_with_the_same_outputs():
    model = quantize(tiny_llama())
    inputs = inputs_for("llama")
    weights = {name: dequantize_weight(m) for name, m in model.named_modules() if is_quantized(m)}
    with torch.no_grad():
        expected = output_of(model, inputs)
    assert dequantize_model(model) is model
    assert not quantized_names(model)
    for name, W in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, W)
        assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
    with torch.no_grad():
        assert (output_of(model, inputs) - expected).abs().max() <= 1e-5
    assert dequantize_model(model) is model  # nothing left to do


def test_dequantize_model_keeps_the_bias():
    model = quantize(linear_model(torch.randn(32, 64), bias=True))
    bias, W = model[0].bias.detach().clone(), dequantize_weight(model[0])
    dequantize_model(model)
    assert torch.equal(model[0].bias, bias) and torch.equal(model[0].weight, W)


# --- quantized_bytes -----------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_bytes_counts_codes_and_state(double_quant):
    model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1024))
    count = 2 * 1024 * 256
    held = quantized_bytes(quantize(model, double_quant=double_quant))
    n = count // 2  # weights per layer
    if double_quant:  # codes, uint8 absmax, fp32 nested absmax (blocks of 256), offset, both code tables
        per_layer = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 16 * 4 + 256 * 4
    else:  # codes, fp32 absmax, the NF4 code table
        per_layer = n // 2 + 4 * n // 64 + 16 * 4
    print(f"NF4 bytes per parameter, double_quant={double_quant}: {held['bytes_per_parameter']:.4f}")
    assert held == {"parameters": count, "bytes": 2 * per_layer, "bytes_per_parameter": 2 * per_layer / count,
                    "layers": 2}
    if double_quant:  # 0.5 + 1/64 + the tables (measured 0.5200)
        assert 0.5 < held["bytes_per_parameter"] <= 0.56
    else:  # 0.5 + 4/64 (measured 0.5626)
        assert 0.5625 <= held["bytes_per_parameter"] <= 0.565


def test_quantized_bytes_without_4bit_layers():
    assert quantized_bytes(tiny_llama()) == {"parameters": 0, "bytes": 0, "bytes_per_parameter": 0.0, "layers": 0}


# --- layers made by others -----------------------------------------------------------------------

def test_layers_loaded_by_transformers_in_4bit(tmp_path):
    """transformers 5 loads BitsAndBytesConfig(load_in_4bit=True) models on the CPU too; its layers
    are the same Linear4bit, quantized by the same bitsandbytes call, so they match ours bit for bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    ours = quantize(tiny_llama())
    assert quantized_names(loaded) == DECODER_LINEARS and not is_quantized(loaded.lm_head)
    for name in DECODER_LINEARS:
        theirs, mine = loaded.get_submodule(name), ours.get_submodule(name)
        assert torch.equal(theirs.weight.data, mine.weight.data)
        assert torch.equal(dequantize_weight(theirs), dequantize_weight(mine))
    assert quantized_bytes(loaded) == quantized_bytes(ours)
    assert quantize(loaded) is loaded and quantized_names(loaded) == DECODER_LINEARS  # left as is
    layer = loaded.get_submodule("model.layers.0.mlp.up_proj")
    W = dequantize_weight(layer)
    requantize_weight_(layer, W)  # the same 4-bit codes; the 8-bit (double-quantized) block scales are
    # quantized afresh from W's block maxima and may land a step apart (bitsandbytes 0.50 on an AVX2 CPU:
    # up to 2e-5 in W), so the layer now holds its own dequantized W, which dequantize_model must give
    assert torch.equal(layer.weight.data, ours.get_submodule("model.layers.0.mlp.up_proj").weight.data)
    held = dequantize_weight(layer)
    dequantize_model(loaded)
    assert not quantized_names(loaded) and torch.equal(loaded.get_submodule("model.layers.0.mlp.up_proj").weight, held)


def test_a_layer_repacked_for_the_cpu_kernel_still_dequantizes():
    """transformers' Linear4bit, in eval mode on an AVX512-BF16 CPU, repacks its codes and casts its
    absmaxes to bf16 on its first forward. Here that repacking is done by hand, so it runs anywhere."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    layer = quantize(linear_model(W))[0]
    before = dequantize_weight(layer)
    codes, state = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    layer.weight.data = codes
    assert layer.weight.quant_state.packing_format_for_cpu
    after = dequantize_weight(layer)
    assert layer.weight.quant_state.packing_format_for_cpu  # dequantizing did not touch the layer
    assert torch.allclose(after, before, rtol=2**-8, atol=0)  # only the absmaxes' bf16 rounding
    assert quantized_bytes(nn.Sequential(layer))["bytes"] > 64 * 128 // 2
    if bnb.functional.has_avx512bf16():  # the repacked kernel computes in bf16
        x = torch.randn(5, 128)
        with torch.no_grad():
            assert relative(layer(x), x @ after.T) < 2e-2
    requantize_weight_(layer, W)  # back to the standard layout, quantized from W afresh
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dequantize_weight(layer), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; every other test runs on the CPU")
def test_quantize_on_cuda_quantizes_on_the_weights_device():
    model = tiny_llama().cuda()
    cpu = quantize(tiny_llama())
    quantize(model)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.weight.device.type == "cuda" and layer.weight.quant_state.absmax.device.type == "cuda"
    assert torch.allclose(dequantize_weight(layer).cpu(), dequantize_weight(cpu.get_submodule(
        "model.layers.0.mlp.up_proj")), atol=1e-6)
    inputs = {k: v.cuda() for k, v in inputs_for("llama").items()}
    with torch.no_grad():
        assert relative(output_of(model, inputs).cpu(), output_of(cpu, inputs_for("llama"))) < 1e-3
