"""The README's table of methods, measured: trainable share of SmolLM2-135M-Instruct's parameters with
each E2E recipe's settings, and what each method supports, read from the registry and checked live.

    .venv/bin/python bench/method_table.py

For every recipes/e2e-*.yaml the adapter is attached to the embedded model; the trainable count
is ft.trainable_parameters. "mixed batch" and "generation" are tried on the model itself (one
forward with adapter_names, one greedy generate() with the KV cache), not taken from a list.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import feathertune as ft
from feathertune.registry import resolve_method

ROOT = Path(__file__).resolve().parents[1]
PEFT_LOADS = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"}  # tests/test_*_interop checks


def works(call) -> str:
    try:
        call()
    except ft.FeathertuneError:
        return "no (refused clearly)"
    return "yes"


def main() -> None:
    base, tokenizer = ft.load_model("smollm2-135m-instruct")
    tokenizer.padding_side = "left"  # generation continues each row from its last token
    ids = tokenizer(["Hello there", "Name a colour"], return_tensors="pt", padding=True)
    base_total = sum(p.numel() for p in base.parameters())  # the share is of the base model's own size
    rows = []
    for recipe in sorted((ROOT / "recipes").glob("e2e-*.yaml")):
        config = ft.load_config(recipe)
        if config.quantization:
            continue  # QLoRA: LoRA's row, over a 4-bit base
        spec, _ = resolve_method(config.method)
        model = copy.deepcopy(base)
        ft.attach(model, config.adapter, name="a")
        trainable, _ = ft.trainable_parameters(model)  # its total also counts the frozen originals of copies
        ft.attach(model, copy.deepcopy(config.adapter), name="b")
        ft.set_active(model, "a")
        with torch.no_grad():
            mixed = works(lambda: model(**ids, adapter_names=["a", "b"]))
            generation = works(lambda: model.generate(**ids, max_new_tokens=4, do_sample=False))
        rows.append((config.method, recipe.name, f"{trainable:,}", f"{100 * trainable / base_total:.3f} %",
                     "yes" if spec.mergeable else "no", mixed, generation,
                     "PEFT's" if spec.peft_type in PEFT_LOADS else f"own (`{spec.peft_type}`)"))
    print("| method | recipe | trainable | share | mergeable | mixed batch | generate() | file |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
