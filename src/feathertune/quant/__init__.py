"""Base-layer quantization for QLoRA: store a model's linear layers in 4-bit NF4, and undo it.

    quantize(model, "nf4")            # every nn.Linear but the output head -> bitsandbytes Linear4bit
    W = dequantize_weight(layer)      # (out, in) in the layer's compute dtype
    requantize_weight_(layer, W + Δ)  # how a merge writes into a 4-bit base
    dequantize_model(model)           # Linear4bit -> nn.Linear: the full-precision export
    quantized_bytes(model)            # what the 4-bit weights really hold

This package knows nothing about adapters: an adapter wraps a 4-bit layer as it wraps nn.Linear,
and merging into one is dequantize -> add -> requantize, with the functions above.
"""

from feathertune.quant.nf4 import (
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantize,
    quantized_bytes,
    requantize_weight_,
)

__all__ = ["dequantize_model", "dequantize_weight", "is_quantized", "quantize", "quantized_bytes",
           "requantize_weight_"]
