"""Leaner saved activations: what a training forward keeps for its backward, cut without changing a
single number (Unsloth's and Liger Kernel's observation that the gated MLP holds most of it).

A gated MLP (Llama, Mistral, Qwen, SmolLM: Shazeer 2020, "GLU Variants Improve Transformer")

    y = W_down · (silu(W_gate·x) ⊙ W_up·x)

keeps four (tokens × intermediate) tensors per layer under plain autograd: g = W_gate·x for silu's
backward, silu(g) and u = W_up·x for the product's, and a = silu(g)⊙u wherever W_down carries an
adapter (its gradient needs its input). With the intermediate size 2.7× the hidden size, that is
over half of a Llama's activation memory. `lean_gated_mlp` keeps only g and u and recomputes
silu(g) and a from them in the backward — a few elementwise operations against the matmuls they
sit between — with the very same operations, so losses and gradients are bitwise those of the
plain path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks


class _SiluProduct(torch.autograd.Function):
    """a = silu(g) ⊙ u, saving (g, u) only; the backward is autograd's own for the two operations."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class _Recompute:
    """Stands in a saved-tensor slot for a = silu(g) ⊙ u, holding only g and u (kept anyway)."""

    __slots__ = ("gate", "up")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor):
        self.gate, self.up = gate, up


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate) each
    if not torch.is_grad_enabled():
        return self.down_proj(F.silu(gate) * up)
    product = _SiluProduct.apply(gate, up)

    def pack(saved: torch.Tensor):  # whatever in down_proj saves the product saves a recipe instead
        same = saved.data_ptr() == product.data_ptr() and saved.shape == product.shape \
            and saved.stride() == product.stride() and saved.dtype == product.dtype
        return _Recompute(gate, up) if same else saved

    def unpack(saved):
        return F.silu(saved.gate) * saved.up if isinstance(saved, _Recompute) else saved

    with saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    """The Llama-family MLP: gate/up/down projections and a SiLU, nothing else with parameters of
    its own (a fused gate_up projection or another activation keeps its own forward)."""
    names = {n for n, _ in module.named_children()}
    if names != {"gate_proj", "up_proj", "down_proj", "act_fn"} or list(module.parameters(recurse=False)):
        return False
    act = module.act_fn
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and type(act).__module__.startswith("transformers."))


def lean_gated_mlp(model: nn.Module) -> int:
    """Give every gated SiLU MLP in `model` the lean forward (in place; idempotent).

    Returns:
        How many MLPs now run it; 0 for models without one (GPT-2, BERT), which keep their own.
    """
    count = 0
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count


def plain_gated_mlp(model: nn.Module) -> None:
    """Undo `lean_gated_mlp`: every MLP runs its class's own forward again."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _lean_forward:
            del module.forward
