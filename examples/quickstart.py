"""feathertune in a few lines: attach LoRA, train a few steps, save, load, merge.

Runs offline in seconds on a CPU: the model is a small GPT-2 built from a config (random weights),
taught to continue one sequence. `feathertune train` (see the README) does the same on real data.
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import feathertune as ft


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM"))


def main() -> None:
    ids = torch.arange(1, 33).unsqueeze(0)  # the sequence to learn: 1, 2, ..., 32

    # --- the README example -------------------------------------------------------------------
    # A random model's output head cannot tell tokens apart, so it gets LoRA too (a trained model's
    # head is usually left alone: target_modules="all-linear" skips it).
    lora = ft.LoraConfig(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    model = ft.attach(tiny_gpt2(), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    out = tempfile.mkdtemp()
    ft.save_adapter(model, out)                              # PEFT format: PEFT and vLLM load it
    loaded = ft.load_adapter(tiny_gpt2(), out)               # same base + adapter file
    merged = ft.merge(loaded)                                # plain GPT2LMHeadModel, LoRA folded in
    # -------------------------------------------------------------------------------------------

    trainable, total = ft.trainable_parameters(model)
    model.eval()
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - merged.eval()(input_ids=ids).logits).abs().max().item()
    print(f"trained {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    print(f"adapter saved to {out}; merged model differs from the adapted one by {diff:.1e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
