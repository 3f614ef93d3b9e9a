"""NF4 storage of linear layers, as in QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs", arXiv:2305.14314).

A weight is cut into blocks of 64 values; each block keeps its absolute maximum and, per value, a
4-bit index into the 16 NF4 levels (quantiles of N(0, 1), scaled to [-1, 1]):

    dequant(W)[i] = NF4[code[i]] · absmax[block(i)]          y = x · dequant(W)ᵀ + b

That costs 0.5 byte per weight plus a float32 absmax per 64 (0.5625 in all). Double quantization
stores the absmaxes in 8 bits too (blocks of 256, minus their mean), for about 0.516.

bitsandbytes does all the quantizing and dequantizing (`quantize_4bit` / `dequantize_4bit`) and
the layers are its `Linear4bit`, so a model quantized here is the same as one transformers loads
with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), and every function here
takes either. bitsandbytes is imported only to quantize: it is an optional dependency.
"""

from __future__ import annotations

import logging

import copy
import difflib
import sys

import torch
from torch import nn

from feathertune.errors import ConfigError
from feathertune.targeting import name_matches, output_head_name

METHODS = ("nf4",)
BLOCKSIZE = 64  # QLoRA's block size (and bitsandbytes' default)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize(model: nn.Module, method: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype = torch.float32, skip_modules: list[str] | None = None,
             quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace, in place, every nn.Linear but the output head by a 4-bit bitsandbytes Linear4bit.

    Each weight is quantized on its own device (CPU or CUDA) and the float weight is dropped; biases
    are kept as they are. Embeddings, the output head (which is often tied to them) and subclasses
    of nn.Linear (whose own forward would be lost) stay in full precision. A model that already
    holds 4-bit layers is returned unchanged, so quantizing twice is harmless; to change the
    settings, start again from the full-precision model.

    Args:
        method: "nf4", the only method.
        double_quant: store the per-block absmaxes in 8 bits too (QLoRA's default).
        compute_dtype: the dtype the matmuls run in: float32, bfloat16 or float16.
        skip_modules: module names left in full precision, by PEFT's rule (the full name, or a
            dotted suffix of it, e.g. "v_proj"); everything inside a named module is left too.
        quant_storage: the dtype the packed 4-bit codes are stored as (the bytes are the same). FSDP
            shards a model's parameters as floats, so a model to be sharded keeps its codes in a
            float dtype, its compute dtype (bitsandbytes' advice for FSDP); uint8 otherwise.

    Returns:
        the same model.

    Raises:
        ConfigError: a bad argument, a skip_modules entry that names no module, bitsandbytes not
            installed, or no layer left to quantize.
    """
    skip = _check_arguments(model, method, double_quant, compute_dtype, skip_modules, quant_storage)
    bnb = _bitsandbytes(f"quantize(method={method!r})")
    if any(is_quantized(m) for m in model.modules()):
        return model
    for name in _quantizable(model, skip):
        parent, child = _parent_of(model, name)
        linear = getattr(parent, child)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=method, device="meta")  # meta: no float weight to allocate
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a layer on its first eval forward: the
        # absmaxes become bf16 (the outputs move by ~1%) and layers whose out_features is not a
        # multiple of 32 fail an assert. Staying in the standard layout keeps the forward exactly
        # x·dequant(W)ᵀ, and what dequantize_weight, requantize_weight_ and state_dict() see.
        layer.support_avx512bf16_for_cpu = False
        _store(bnb, layer, linear.weight.detach(), quant_type=method, double_quant=double_quant,
               blocksize=BLOCKSIZE, quant_storage=quant_storage)
        if linear.bias is not None:
            layer.bias = linear.bias
        layer.train(linear.training)
        setattr(parent, child, layer)  # the float weight goes with the old layer
    return model


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit: made by `quantize`, or by transformers' 4-bit loading."""
    # No Linear4bit can exist before bitsandbytes is imported, and importing it takes seconds:
    # adapters ask this of every layer they wrap, quantized or not.
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight W as floats, (out, in), in its compute dtype (float32 unless set).

    Raises:
        ConfigError: `module` is not a 4-bit layer.
    """
    _require_quantized(module, "dequantize_weight")
    import bitsandbytes as bnb

    weight = module.weight
    if not getattr(weight, "bnb_quantized", False):  # a Linear4bit not yet moved to a device holds floats
        return weight.detach().to(_compute_dtype(module))
    codes, state = _standard_layout(weight.data, weight.quant_state)
    return bnb.functional.dequantize_4bit(codes, state).to(_compute_dtype(module))  # (out, in)


def requantize_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's 4-bit weight by a fresh quantization of `weight` (out, in), with the same
    quant type, double quantization, block size and storage dtype. `requantize_weight_(m,
    dequantize_weight(m))` leaves the codes as they are; W + Δ moves the weights by Δ, give or
    take the rounding.

    Raises:
        ConfigError: `module` is not a 4-bit layer, or `weight` has the wrong shape.
    """
    _require_quantized(module, "requantize_weight_")
    import bitsandbytes as bnb

    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ConfigError(f"requantize_weight_ got a weight of shape {tuple(weight.shape)}, but this layer "
                          f"is {expected} (out_features, in_features); pass W in that orientation",
                          source="requantize_weight_")
    old = module.weight
    state = old.quant_state if getattr(old, "bnb_quantized", False) else None
    # Quantize from the dtype the layer was quantized from, so its state keeps the same layout.
    dtype = old.dtype if state is None else getattr(state, "original_dtype", state.dtype)
    _store(bnb, module, weight.detach().to(device=old.device, dtype=dtype), quant_type=old.quant_type,
           double_quant=old.compress_statistics, blocksize=old.blocksize, quant_storage=old.quant_storage)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every 4-bit layer by an nn.Linear holding its dequantized weight (in the
    layer's compute dtype) and its bias: the full-precision export of a QLoRA model. Adapters
    that wrap a 4-bit layer keep wrapping the new one. Parameters keep their requires_grad (a
    4-bit weight is always frozen, so the new weight is too).

    Returns:
        the same model; one without 4-bit layers is returned unchanged.
    """
    if is_quantized(model):
        raise ConfigError("dequantize_model works in place on a model's layers, but was given a single "
                          "Linear4bit; use dequantize_weight(layer), or wrap it in nn.Sequential",
                          source="dequantize_model")
    for name in [n for n, m in model.named_modules() if is_quantized(m)]:
        parent, child = _parent_of(model, name)
        layer = getattr(parent, child)
        weight = dequantize_weight(layer)  # (out, in)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            bias = layer.bias
            linear.bias = bias if bias.dtype == weight.dtype else nn.Parameter(
                bias.detach().to(weight.dtype), requires_grad=bias.requires_grad)
        linear.train(layer.training)
        setattr(parent, child, linear)
    return model


def quantized_bytes(model: nn.Module) -> dict:
    """Memory held by the 4-bit layers' weights, with each tensor's storage counted once.

    That is the packed codes (two per byte) and the quantization state: the absmaxes (uint8 when
    double quantized, else float), the nested absmaxes, the offset and both code tables. Biases
    are not counted.

    Returns:
        {"parameters": weights represented, "bytes": bytes held, "bytes_per_parameter": their
        ratio (0.0 without 4-bit layers), "layers": how many 4-bit layers}.
    """
    seen, parameters, held, layers = set(), 0, 0, 0
    for module in model.modules():
        if not is_quantized(module):
            continue
        layers += 1
        parameters += module.out_features * module.in_features
        for tensor in _held_tensors(module.weight):
            storage = tensor.untyped_storage()
            key = (tensor.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                held += storage.nbytes()
    return {"parameters": parameters, "bytes": held,
            "bytes_per_parameter": held / parameters if parameters else 0.0, "layers": layers}


# --- helpers -------------------------------------------------------------------------------------

def _store(bnb, module: nn.Module, weight: torch.Tensor, *, quant_type: str, double_quant: bool,
           blocksize: int, quant_storage: torch.dtype) -> None:
    """Quantize `weight` (out, in) with bitsandbytes and make it the module's Params4bit."""
    codes, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                compress_statistics=double_quant, quant_type=quant_type,
                                                quant_storage=quant_storage)  # codes: (out·in/2, 1)
    module.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=blocksize,
                                      compress_statistics=double_quant, quant_type=quant_type,
                                      quant_storage=quant_storage, module=module, bnb_quantized=True)
    module.quant_state = state  # Linear4bit keeps a second reference, to recover the state after FSDP


def _standard_layout(codes: torch.Tensor, state):
    """(codes, state) as `quantize_4bit` lays them out, without touching the layer.

    A layer that bitsandbytes repacked for its AVX512-BF16 CPU kernel (see `quantize`; transformers'
    layers do that on their first eval forward) holds the codes in tiles and the absmaxes as a bf16
    (in/64, out) matrix. Its own inverse would also re-quantize the absmaxes, so here they are kept
    as the repacked forward uses them.
    """
    if not getattr(state, "packing_format_for_cpu", False):
        return codes, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    standard = copy.copy(state)  # the inverse assigns fields of the state it gets: give it a copy
    standard.original_nested = False
    codes, standard = _convert_weight_packed_for_cpu_inverse(codes, standard)
    standard.absmax = state.absmax.T.reshape(-1).float()  # (in/64, out) -> the flat per-block order
    return codes, standard


def _held_tensors(weight) -> list[torch.Tensor]:
    """The tensors a Params4bit holds: its codes and those of its quantization state."""
    state = getattr(weight, "quant_state", None)
    if not getattr(weight, "bnb_quantized", False) or state is None:
        return [weight.data]
    nested = getattr(state, "state2", None)
    found = [weight.data, state.absmax, state.code, getattr(state, "offset", None)]
    if nested is not None:
        found += [nested.absmax, nested.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _compute_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None:
        state = module.weight.quant_state
        dtype = getattr(state, "original_dtype", None) or getattr(state, "dtype", None) or torch.float32
    return dtype


def _bitsandbytes(caller: str):
    # On AVX512-BF16 CPUs, bitsandbytes' import tries an optional kernel package and logs a warning
    # when it is absent; feathertune turns that code path off (see quantize), so the warning is noise.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{caller} needs bitsandbytes, which is not installed; install it with "
                          "`pip install bitsandbytes` (its 4-bit layers run on CPU and CUDA)",
                          source="quantize") from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def _require_quantized(module: nn.Module, caller: str) -> None:
    if not is_quantized(module):
        raise ConfigError(f"{caller} needs a 4-bit layer (bitsandbytes Linear4bit, see is_quantized), "
                          f"but got {type(module).__name__}; quantize the model first with "
                          "feathertune.quant.quantize(model)", source=caller)


def _quantizable(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the layers `quantize` replaces; raises ConfigError when there is none."""
    head = output_head_name(model)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear and name]
    chosen = [n for n in linears if n != head and not _skipped(n, skip)]
    if chosen:
        return chosen
    near_misses: dict[str, int] = {}  # linear-like layers that quantize leaves alone
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Conv1D" or (isinstance(module, nn.Linear) and type(module) is not nn.Linear):
            near_misses[kind] = near_misses.get(kind, 0) + 1
    others = "".join(f"; {n} {k} layers are not quantized (only nn.Linear is)" for k, n in sorted(near_misses.items()))
    if type(model) is nn.Linear:
        found = "the model is itself one nn.Linear, and quantize replaces a model's layers in place " \
                "(wrap it in nn.Sequential)"
    elif not linears:
        found = "the model has no nn.Linear layer"
    else:
        found = (f"all {len(linears)} nn.Linear layers are the output head ({head}) or in "
                 f"skip_modules={skip}; remove names from skip_modules")
    raise ConfigError(f"quantize found no layer to quantize: {found}{others}", source="quantize")


def _skipped(name: str, skip: list[str]) -> bool:
    """PEFT's list rule on the name and on each enclosing module's name."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), skip) for i in range(1, len(parts) + 1)) if skip else False


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _check_arguments(model, method, double_quant, compute_dtype, skip_modules, quant_storage) -> list[str]:
    """Raise one ConfigError listing every bad argument; return skip_modules as a list."""
    problems = []
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method).lower(), METHODS, n=1, cutoff=0.5)
        problems.append(f"method={method!r} is not supported; allowed: {', '.join(map(repr, METHODS))} "
                        "(4-bit NormalFloat, QLoRA's)" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if not isinstance(double_quant, bool):
        problems.append(f"double_quant={double_quant!r} must be True or False")
    if compute_dtype not in COMPUTE_DTYPES:
        named = isinstance(compute_dtype, str) and isinstance(getattr(torch, compute_dtype, None), torch.dtype)
        problems.append(f"compute_dtype={compute_dtype!r} must be one of {', '.join(map(str, COMPUTE_DTYPES))}"
                        + (f" (use torch.{compute_dtype}, not the string)" if named else ""))
    if quant_storage not in (torch.uint8, *COMPUTE_DTYPES):
        problems.append(f"quant_storage={quant_storage!r} must be torch.uint8 or one of "
                        f"{', '.join(map(str, COMPUTE_DTYPES))} (a float one for FSDP)")
    skip = []
    if skip_modules is not None:
        if isinstance(skip_modules, str) or not isinstance(skip_modules, (list, tuple)) \
                or not all(isinstance(s, str) and s for s in skip_modules):
            problems.append(f"skip_modules={skip_modules!r} must be a list of module names, e.g. ['v_proj']")
        else:
            skip = list(skip_modules)
    names = [n for n, _ in model.named_modules() if n]
    for entry in skip:
        if not any(name_matches(n, [entry]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            hint = difflib.get_close_matches(entry, leaves, n=1)
            problems.append(f"skip_modules entry {entry!r} names no module; modules include "
                            f"{', '.join(leaves[:12])}{' …' if len(leaves) > 12 else ''}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if problems:
        raise ConfigError(problems, source="quantize")
    return skip
