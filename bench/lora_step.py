"""Training-step time of feathertune vs PEFT for LoRA and DoRA, on the same model, same run.

    .venv/bin/python bench/lora_step.py [--hidden 512] [--layers 4] [--repeats 5]

Both libraries wrap the same randomly initialised Llama (all linear layers, r=16); each measured
step is forward + backward + AdamW on a (batch, seq) of random tokens. Runs alternate between the
libraries so that machine noise hits both alike; the table reports medians and the ratio
PEFT / feathertune (above 1: feathertune is faster). Where DoRA differs most is the norm
‖W + s·B·A‖_row: PEFT forms the out × in matrix every step, feathertune uses the closed form.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    return LlamaForCausalLM(config)


def with_feathertune(base, dora: bool):
    import feathertune as ft

    return ft.attach(copy.deepcopy(base), ft.LoraConfig(r=16, alpha=32, dropout=0.0, use_dora=dora,
                                                        target_modules="all-linear"))


def with_peft(base, dora: bool):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, use_dora=dora, target_modules="all-linear")
    return peft.get_peft_model(copy.deepcopy(base), config)


def step_seconds(model, ids, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss  # warm-up step, not timed
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = build(args.hidden, args.layers)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"Llama hidden={args.hidden} layers={args.layers}, batch {args.batch}×{args.seq}, "
          f"r=16 all-linear, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':<6} {'feathertune s/step':>19} {'PEFT s/step':>12} {'PEFT/ft':>8}")
    for dora in (False, True):
        ours, theirs = with_feathertune(base, dora), with_peft(base, dora)
        times = {"ft": [], "peft": []}
        for _ in range(args.repeats):
            times["ft"].append(step_seconds(ours, ids, args.steps))
            times["peft"].append(step_seconds(theirs, ids, args.steps))
        ft_s, peft_s = statistics.median(times["ft"]), statistics.median(times["peft"])
        print(f"{'DoRA' if dora else 'LoRA':<6} {ft_s:>19.3f} {peft_s:>12.3f} {peft_s / ft_s:>8.2f}")


if __name__ == "__main__":
    main()
