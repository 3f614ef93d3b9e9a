"""Issue 11's speed and memory switches change no number that matters: for each one, 20 AdamW steps
of LoRA (and DoRA) training on a tiny Llama with masked prompts and padding give the same losses and
gradients as the plain path, within 1e-5 relative in fp32; the loop's switches reach the step."""

from __future__ import annotations

import json

import pytest
import torch
from models import VOCAB, tiny_llama
from runs import make_workspace, write_config

from feathertune.adapters import adapter_parameters, attach
from feathertune.loss import loss_sum
from feathertune.methods.lora import LoraConfig
from feathertune.saved_activations import lean_gated_mlp, plain_gated_mlp

STEPS = 20
TOLERANCE = 1e-5


def _batches(seed: int = 0, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Rows of uneven lengths, right-padded; the first tokens of each row are its prompt (-100)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(6, 17, (4,), generator=generator)
        T = int(lengths.max())
        ids = torch.randint(3, VOCAB, (4, T), generator=generator)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), ids, -100)
        prompt = torch.randint(2, 5, (4, 1), generator=generator)
        labels = torch.where(torch.arange(T)[None] < prompt, -100, labels)
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return batches


def _train(config: LoraConfig, *, sparse_head: bool, lean: bool, mask_free: bool = False
           ) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Losses and every step's adapter gradients over STEPS AdamW steps."""
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    attach(model, config)
    with torch.no_grad():  # B away from zero so that every factor has a real gradient from step 0
        for param in adapter_parameters(model, "default"):
            param.add_(0.1 * torch.randn_like(param))
    if lean:
        assert lean_gated_mlp(model) == 2  # both blocks' MLPs
    params = adapter_parameters(model, "default")
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    batches = _batches()
    losses, grads = [], []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same dropout masks in both runs
        inputs = batches[step % len(batches)]
        loss = loss_sum(model, inputs, sparse_head=sparse_head, mask_free_attention=mask_free) \
            / (inputs["labels"][:, 1:] != -100).sum()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.detach().clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _assert_same_training(plain, fast):
    for step, (a, b) in enumerate(zip(plain[0], fast[0])):
        assert abs(a - b) <= TOLERANCE * abs(a), (step, a, b)
    for step, (ga, gb) in enumerate(zip(plain[1], fast[1])):
        for k, (x, y) in enumerate(zip(ga, gb)):
            gap = float((x - y).norm() / x.norm().clamp_min(1e-30))
            assert gap <= TOLERANCE, f"step {step}, parameter {k}: relative gradient gap {gap:.2e}"


@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8, dropout=0.0),
                                    LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True)],
                         ids=["lora", "dora-dropout"])
def test_sparse_head_trains_as_the_full_head(config):
    _assert_same_training(_train(config, sparse_head=False, lean=False), _train(config, sparse_head=True, lean=False))


@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8, dropout=0.0),
                                    LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True)],
                         ids=["lora", "dora-dropout"])
def test_lean_mlp_trains_as_the_plain_mlp(config):
    plain, lean = _train(config, sparse_head=False, lean=False), _train(config, sparse_head=False, lean=True)
    _assert_same_training(plain, lean)
    assert plain[0] == lean[0]  # the same operations in the same order: bitwise, not just close


@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8, dropout=0.0),
                                    LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True)],
                         ids=["lora", "dora-dropout"])
def test_mask_free_attention_trains_as_the_padding_mask(config):
    _assert_same_training(_train(config, sparse_head=False, lean=False),
                          _train(config, sparse_head=False, lean=False, mask_free=True))


def test_the_padding_mask_stays_where_it_matters(monkeypatch):
    """Left padding, or an adapter that reads the mask (ReFT's positions), keeps it; right padding drops it."""
    from feathertune.loss import _mask_is_redundant
    from feathertune.methods.reft import ReftConfig

    model = tiny_llama()
    attach(model, LoraConfig(r=4, alpha=8))
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert _mask_is_redundant(model, right) and not _mask_is_redundant(model, right.flip(-1))
    reft = tiny_llama()
    attach(reft, ReftConfig())
    assert not _mask_is_redundant(reft, right)
    from models import tiny_gpt2
    assert not _mask_is_redundant(tiny_gpt2(), right)  # not a *ForCausalLM class: left as it is


def test_lean_mlp_keeps_two_of_four_intermediate_activations_and_undoes():
    from torch.autograd.graph import saved_tensors_hooks

    model = tiny_llama(seed=0)
    attach(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    inputs = _batches(count=1)[0]
    intermediate = model.config.intermediate_size

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_intermediate_storages() -> int:
        seen = set()

        def pack(t):  # activations (not weights) of the intermediate width, each storage once
            if t.dim() >= 2 and t.shape[-1] == intermediate and t.untyped_storage().data_ptr() not in weights:
                seen.add(t.untyped_storage().data_ptr())
            return t
        with saved_tensors_hooks(pack, lambda t: t):
            loss_sum(model, inputs)
        return len(seen)

    plain = saved_intermediate_storages()
    lean_gated_mlp(model)
    lean = saved_intermediate_storages()
    assert (plain, lean) == (4 * 2, 2 * 2)  # per block: gate, silu(gate), up, product → gate, up
    plain_gated_mlp(model)
    assert saved_intermediate_storages() == plain
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():  # inference takes the plain path's operations (nothing is saved)
        plain_logits = model(input_ids=ids, attention_mask=mask).logits
        lean_gated_mlp(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain_logits)


def test_models_without_a_gated_mlp_keep_their_own_forward():
    from models import tiny_gpt2

    assert lean_gated_mlp(tiny_gpt2()) == 0


def test_the_loop_trains_the_same_with_every_switch_off(tmp_path):
    from feathertune.train.config import load_config
    from feathertune.train.loop import run

    root, config = make_workspace(tmp_path)
    config["train"].update({"max_steps": 4, "checkpoint_every": 0, "precision": "fp32"})
    config["eval"] = {"max_new_tokens": 2, "batch_size": 4, "samples": 0, "compare_base": False}
    losses = {}
    for name, switches in {"fast": {}, "plain": {"sparse_head": False, "lean_mlp": False, "mask_free_attention": False}}.items():
        path = write_config(root, config, name, train=switches, output=str(root / name))
        run(load_config(path), log=lambda *a: None)
        records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["fast"]) == 4
    for a, b in zip(losses["plain"], losses["fast"]):
        assert abs(a - b) <= TOLERANCE * abs(a)


def test_precision_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    from feathertune.train.loop import resolved_precision

    cpu = torch.device("cpu")
    assert resolved_precision("fp32", cpu) == "fp32" and resolved_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolved_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolved_precision("auto", cpu) == "bf16"
