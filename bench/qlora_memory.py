"""What NF4 (QLoRA's 4-bit base) saves in memory on SmolLM2-135M-Instruct, and what it costs in loss.

    .venv/bin/python bench/qlora_memory.py [--batch 8] [--limit N] [--json out/qlora_memory.json]

For the fp32 model and for the model quantized by `feathertune.quant.quantize` (with and without
double quantization) it reports:
- the bytes that the quantized linear weights really hold (`quantized_bytes`: packed 4-bit codes
  plus absmaxes, nested absmaxes and code tables), per weight: 4 in fp32, ~0.52 / ~0.56 in NF4;
- the bytes of all the model's parameters (the tied embedding / output head stays fp32);
- the mean cross-entropy per assistant token on the E2E validation set (each example: its prompt
  as the user turn, its first reference as the answer; loss only on the answer's tokens), and its
  change against fp32, for fp32 and NF4 with double quantization (`--all-losses`: without too).
  QLoRA's premise is that this change is small (a few percent).
The model is the embedded one, so this runs offline. On 2 CPU cores it takes a few minutes, most of
it in bitsandbytes' CPU kernels (quantizing, and dequantizing each layer on every forward).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from feathertune.data import collate, read_examples, tokenize_examples
from feathertune.evaluate import language_model_loss
from feathertune.models import load_model
from feathertune.quant import is_quantized, quantize, quantized_bytes

REPO = Path(__file__).resolve().parent.parent


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, shared ones once; a 4-bit weight counts with its quantization state."""
    four_bit = {id(m.weight) for m in model.modules() if is_quantized(m)}
    plain = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in four_bit)
    return plain + quantized_bytes(model)["bytes"]


def measure(name: str, model, batches, reference_loss: float | None) -> dict:
    """Memory figures of `model`, and its loss on `batches` unless that is None."""
    start = time.perf_counter()
    loss = language_model_loss(model, batches) if batches is not None else {"loss": None, "tokens": None}
    held = quantized_bytes(model)
    change = None if reference_loss is None or loss["loss"] is None else loss["loss"] / reference_loss - 1
    return {"variant": name, "linear_parameters": held["parameters"], "linear_bytes": held["bytes"],
            "linear_bytes_per_parameter": held["bytes_per_parameter"] if held["layers"] else 4.0,
            "quantized_layers": held["layers"], "parameter_bytes": parameter_bytes(model),
            "loss": loss["loss"], "tokens": loss["tokens"], "loss_change": change,
            "eval_seconds": time.perf_counter() - start if batches is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(REPO / "data" / "e2e" / "validation.jsonl"))
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--all-losses", action="store_true",
                        help="also evaluate NF4 without double quantization (by default only its memory)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    args = parser.parse_args()
    started = time.perf_counter()

    model, tokenizer = load_model(args.model)
    examples = read_examples(args.data)
    if args.limit is not None:
        examples.items = examples.items[: args.limit]
    rows = tokenize_examples(examples, tokenizer, args.max_length).rows
    batches = [collate(rows[i:i + args.batch], tokenizer.pad_token_id) for i in range(0, len(rows), args.batch)]

    fp32 = measure("fp32", model, batches, None)
    # fp32's linear figures are those of the layers NF4 quantizes: the same weights, 4 bytes each.
    results = [fp32]
    for double_quant in (True, False):
        model, _ = load_model(args.model)
        start = time.perf_counter()
        quantize(model, "nf4", double_quant=double_quant)
        seconds = time.perf_counter() - start
        name = "nf4 + double quant" if double_quant else "nf4"
        evaluated = batches if double_quant or args.all_losses else None
        results.append(measure(name, model, evaluated, fp32["loss"]) | {"quantize_seconds": seconds})
    fp32["linear_parameters"] = results[1]["linear_parameters"]
    fp32["linear_bytes"] = 4 * fp32["linear_parameters"]

    print(f"{args.model}: {len(rows)} E2E validation examples, {fp32['tokens']} assistant tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<19} {'linear B/param':>14} {'linear MiB':>10} {'all params MiB':>14} "
          f"{'CE nats/token':>13} {'vs fp32':>8} {'eval s':>7}")
    for r in results:
        change = "" if r["loss_change"] is None else f"{100 * r['loss_change']:+.2f}%"
        loss = "—" if r["loss"] is None else f"{r['loss']:.4f}"
        seconds = "" if r["eval_seconds"] is None else f"{r['eval_seconds']:.1f}"
        print(f"{r['variant']:<19} {r['linear_bytes_per_parameter']:>14.4f} {r['linear_bytes'] / 2**20:>10.1f} "
              f"{r['parameter_bytes'] / 2**20:>14.1f} {loss:>13} {change:>8} {seconds:>7}")
    total = time.perf_counter() - started
    print(f"({results[1]['quantized_layers']} linear layers, {fp32['linear_parameters']:,} weights quantized; "
          f"quantize took {results[1]['quantize_seconds']:.1f} s; {total:.0f} s in all)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        figures = {"model": args.model, "data": args.data, "examples": len(rows), "seconds": total,
                   "variants": results}
        path.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
