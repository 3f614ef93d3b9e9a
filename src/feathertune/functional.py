"""The adapter math as pure functions.

Every method's forward, merge and export call these, so no formula is written twice. Shapes follow
PEFT's storage layout, because that is the layout the files use:

    A: (r, in)    B: (out, r)        linear / Conv1D (weights seen as (out, in))
    A: (r, in, kh, kw)  B: (out, r, 1, 1)   Conv2d
    A: (r, num_embeddings)  B: (dim, r)     Embedding
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's scale s in `W + s·B·A`: α/r (Hu et al. 2022) or α/√r (rsLoRA, Kalajdzievski 2023).

    rsLoRA's √r keeps the update's magnitude stable as r grows, so larger ranks actually help.
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The update s·B·A as a weight of the base's (out, in, ...) shape.

    For Conv2d the product runs over the flattened kernel: B (out, r) @ A (r, in·kh·kw).
    """
    B2 = B.flatten(1)  # (out, r)
    A2 = A.flatten(1)  # (r, in·kh·kw)
    return (scale * (B2 @ A2)).reshape(B.shape[0], *A.shape[1:])


def lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B·A·x for a batch of row vectors x (..., in) -> (..., out), without forming B·A.

    The scale multiplies the r-wide middle, not the out-wide result: same maths, a fraction of the
    elementwise work in the forward and the backward.
    """
    return F.linear(F.linear(x, A) * scale, B)


def lora_conv2d(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                stride, padding, dilation) -> torch.Tensor:
    """s·conv(conv(x, A), B): A is a conv with the base's kernel into r channels, B a 1×1 conv out."""
    # (N, in, H, W) -> (N, r, H', W') -> (N, out, H', W')
    return F.conv2d(F.conv2d(x, A, stride=stride, padding=padding, dilation=dilation) * scale, B)


def lora_embedding(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   padding_idx: int | None = None) -> torch.Tensor:
    """s·(B·A)ᵀ[ids]: row `ids` of the low-rank embedding update. (...,) -> (..., dim)."""
    # A is (r, num_embeddings): its transpose is a lookup table of r-dim codes.
    return (F.embedding(ids, A.T, padding_idx=padding_idx) * scale) @ B.T


def squared_row_norm(W: torch.Tensor) -> torch.Tensor:
    """‖W‖² of each output row, for a weight of shape (out, ...). -> (out,)"""
    return W.flatten(1).pow(2).sum(dim=1)


def dora_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  w_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, without forming the (out × in) matrix W + s·B·A.

    Expands the square: ‖W‖² + 2s·rowsum(B ⊙ (W·Aᵀ)) + s²·rowsum((B·A·Aᵀ) ⊙ B). The costs are
    out·in·r for W·Aᵀ and r²·(in + out) for the rest, and ‖W‖² is cached by the caller since the base
    is frozen. PEFT materialises W + s·B·A every step instead. -> (out,)

    Args:
        W: base weight (out, in) or (out, in, kh, kw).
        A, B: the LoRA factors in storage layout.
        w_sq_norm: ‖W‖² per row if already known.
    """
    W2, A2, B2 = W.flatten(1), A.flatten(1), B.flatten(1)  # (out, k), (r, k), (out, r)
    if w_sq_norm is None:
        w_sq_norm = squared_row_norm(W2)
    cross = (B2 * (W2 @ A2.T)).sum(dim=1)  # (out,)
    quad = ((B2 @ (A2 @ A2.T)) * B2).sum(dim=1)  # (out,)
    # Rounding can push a (near-)zero row slightly negative; clamp before the root.
    return (w_sq_norm + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


def dora_ratio(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """c = m/‖W + s·B·A‖ per output row (any shapes with one entry per row). -> (out,)"""
    return magnitude.reshape(-1) / norm.reshape(-1)


def dora_update(base: torch.Tensor, lora: torch.Tensor, ratio: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """What a DoRA adapter adds to the base: (c − 1)·base + c·lora, with c = dora_ratio(m, ‖W + s·B·A‖).

    The same formula serves the forward and the merge, on outputs or on weights:
      forward: base = W·x (bias removed), lora = s·B·A·x, channel_dim = the output-feature axis;
               base(x) + this = m·V·x/‖V‖ + bias (Liu et al. 2024, eq. 5)
      merge:   base = W, lora = s·B·A, channel_dim = 0; W + this = m·V/‖V‖, DoRA's merged weight.
    The norm inside c is detached by the caller in the forward (the paper's §4.3: treat it as a
    constant for the gradient, which saves memory at no cost in accuracy).
    """
    shape = [1] * base.dim()
    shape[channel_dim] = -1
    c = ratio.reshape(shape)
    return (c - 1) * base + c * lora


def merged_weight(W: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """W with several adapters folded in: W + Σᵢ uᵢ, uᵢ = s·Bᵢ·Aᵢ (LoRA) or dora_update(W, s·Bᵢ·Aᵢ) (DoRA).

    `updates`: (s·Bᵢ·Aᵢ as a weight, cᵢ = mᵢ/‖W + s·Bᵢ·Aᵢ‖ per row or None for LoRA). Every term is
    computed from the same original W, so the result is W·Π + Σ cᵢ·s·Bᵢ·Aᵢ with Π = 1 + Σ(cᵢ − 1).
    """
    out = W.clone()
    for delta, ratio in updates:
        out += delta if ratio is None else dora_update(W, delta, ratio, channel_dim=0)
    return out


def unmerged_weight(merged: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """The inverse of merged_weight for the same `updates`: W = (W' − Σ cᵢ·s·Bᵢ·Aᵢ) / Π."""
    shape = (-1,) + (1,) * (merged.dim() - 1)
    slope = torch.ones(merged.shape[0], dtype=merged.dtype, device=merged.device)
    offset = torch.zeros_like(merged)
    for delta, ratio in updates:
        if ratio is None:
            offset += delta
        else:
            offset += ratio.reshape(shape) * delta
            slope += ratio.reshape(-1) - 1
    return (merged - offset) / slope.reshape(shape)


# --- Combining LoRA adapters: ΔW = Σᵢ cᵢ·Bᵢ·Aᵢ, cᵢ = wᵢ·sᵢ, as one (A, B) at scale 1 -------------


def lora_weighted_delta(As: list[torch.Tensor], Bs: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """Σᵢ cᵢ·Bᵢ·Aᵢ as one weight of the base's (out, in, ...) shape (see lora_delta_weight)."""
    return sum(lora_delta_weight(A, B, c) for A, B, c in zip(As, Bs, coefs))


def lora_cat(As: list[torch.Tensor], Bs: list[torch.Tensor], coefs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A₁; A₂; …] (rows), B = [c₁·B₁, c₂·B₂, …] (columns): B·A = Σᵢ cᵢ·Bᵢ·Aᵢ exactly, rank Σᵢ rᵢ.

    A (Σr, in, ...), B (out, Σr, ...): the block product adds the adapters' updates, nothing else.
    """
    return torch.cat(list(As), dim=0), torch.cat([c * B for B, c in zip(Bs, coefs)], dim=1)


def lora_linear_combination(As: list[torch.Tensor], Bs: list[torch.Tensor],
                            coefs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Σᵢ cᵢ·Aᵢ / √|S|, B = sign(S)·Σᵢ cᵢ·Bᵢ / √|S| with S = Σᵢ cᵢ; every Aᵢ (r, ...), Bᵢ (out, r, ...).

    B·A = (1/S)·Σᵢⱼ cᵢ·cⱼ·Bᵢ·Aⱼ, which equals Σᵢ cᵢ·Bᵢ·Aᵢ when all Aᵢ are equal or all Bᵢ are
    (the sum over the shared factor is S), and otherwise carries the cross terms i ≠ j: an
    approximation. S = 0 has no such factorisation; the caller refuses it.
    """
    total = sum(coefs)
    root = math.sqrt(abs(total))
    A = sum(c * A for A, c in zip(As, coefs)) / root
    B = sum(c * B for B, c in zip(Bs, coefs)) * (math.copysign(1.0, total) / root)
    return A, B


def truncated_svd_factors(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-k factors of a weight (out, in, ...): B = U_k·√Σ_k, A = √Σ_k·V_kᵀ, B·A ≈ ΔW.

    Eckart–Young: ‖ΔW − B·A‖_F = √(Σ_{j>k} σⱼ²), the smallest of any rank-k matrix; exact when k ≥
    rank(ΔW). √σ goes to both sides so A and B have the same norms. Conv kernels are flattened to
    (out, in·kh·kw) and come back as A (k, in, kh, kw), B (out, k, 1, 1). Cost: one SVD of out × in.
    """
    U, S, Vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)  # (out, m), (m,), (m, in·…)
    root = S[:k].sqrt()
    B = U[:, :k] * root[None, :]  # (out, k)
    A = root[:, None] * Vh[:k]  # (k, in·…)
    return A.reshape(k, *delta.shape[1:]), B.reshape(delta.shape[0], k, *[1] * (delta.dim() - 2))


# --- (IA)³ (Liu et al. 2022): learned vectors that rescale activations -------------------------


def ia3_combined(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The one vector that several (IA)³ vectors on the same activation amount to: their product.

    Stored as (out, 1) or (1, in) (PEFT's layout); returned flat. -> (d,)
    """
    out = vectors[0].flatten()
    for vector in vectors[1:]:
        out = out * vector.flatten()
    return out


def ia3_scale(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """l ⊙ h over the last (feature) dimension, in h's dtype. h (..., d); l (d,) or (B, 1, …, 1, d)."""
    return (h * scale).to(h.dtype)


def ia3_merged_weight(W: torch.Tensor, scale_in: torch.Tensor | None,
                      scale_out: torch.Tensor | None) -> torch.Tensor:
    """diag(l_out)·W·diag(l_in): the weight of l_out ⊙ (W·(l_in ⊙ x)). W (out, in), l flat."""
    if scale_out is not None:
        W = W * scale_out[:, None]
    if scale_in is not None:
        W = W * scale_in[None, :]
    return W


def ia3_merged_bias(b: torch.Tensor, scale_out: torch.Tensor | None) -> torch.Tensor:
    """l_out ⊙ b: output scaling rescales the bias too (the input scaling never reaches it)."""
    return b if scale_out is None else b * scale_out


# --- Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) --------------------------

BOTTLENECK_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def bottleneck_update(h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
                      up_weight: torch.Tensor, up_bias: torch.Tensor, non_linearity: str) -> torch.Tensor:
    """W_up·f(W_down·h + b_down) + b_up: what a bottleneck adapter adds to its sublayer's output h.

    h (..., d) -> (..., m) -> (..., d), with W_down (m, d) and W_up (d, m); 2·d·m multiply-adds a
    token. The caller adds it to h (the adapter's own skip connection, Houlsby et al. fig. 2).
    """
    hidden = BOTTLENECK_ACTIVATIONS[non_linearity](F.linear(h, down_weight, down_bias))  # (..., m)
    return F.linear(hidden, up_weight, up_bias)  # (..., d)


# --- LLaMA-Adapter (Zhang et al. 2023): the gated attention to the adaption prompts --------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x₁, x₂) -> (−x₂, x₁) over the two halves of the last dimension, as Llama's rotary does."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the query: q·cos + rotate_half(q)·sin. q (B, H, T, d), cos and sin (B, T, d)."""
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def adaption_prompt_attention(q: torch.Tensor, k_prompt: torch.Tensor, v_prompt: torch.Tensor,
                              gate: torch.Tensor) -> torch.Tensor:
    """g · softmax(q·k_Pᵀ/√d_h) · v_P, the adaption prompts' share of one attention layer (eq. 8).

    The prompt keys carry no rotary (the prompts have no position) and there is no mask: every
    query sees all L prompts. The softmax runs over the prompts alone, in float32 at least as PEFT
    does, and the zero-initialised gate g scales it, so the layer starts exactly at the base.
    Grouped-query attention: query head h reads key/value head h // (H / H_kv). The caller applies
    the layer's o_proj. Cost: 2·B·H·T·L·d, small next to the T² of the layer's own attention.

    Args:
        q: the layer's rotary query (B, H, T, d).
        k_prompt, v_prompt: k_proj(P) and v_proj(P), (L, H_kv·d) or (1, L, H_kv·d).
        gate: (1,), one scalar per layer.

    Returns:
        (B, T, H·d), in q's dtype.
    """
    B, H, T, d = q.shape
    k = k_prompt.reshape(-1, k_prompt.shape[-1] // d, d).transpose(0, 1).to(q.dtype)  # (H_kv, L, d)
    v = v_prompt.reshape(-1, v_prompt.shape[-1] // d, d).transpose(0, 1).to(q.dtype)  # (H_kv, L, d)
    groups = H // k.shape[0]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)  # (H, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, L)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = (gate.to(q.dtype) * weights) @ v  # (B, H, T, d)
    return out.transpose(1, 2).reshape(B, T, H * d)


# --- Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): virtual tokens -------


def prepend_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[P; E[x]]: the n learned prompt vectors in front of every sequence's token embeddings.

    prompt (n, d), embeds (B, T, d) -> (B, n+T, d), in the embeddings' dtype.
    """
    P = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, n, d), no copy
    return torch.cat([P, embeds], dim=1)


def prepend_constant(x: torch.Tensor, n: int, value) -> torch.Tensor:
    """n entries `value` in front of x's last dimension: (..., T) -> (..., n+T), in x's dtype.

    What the virtual tokens get in the attention mask (1: attended), the labels (-100: no loss) and
    the token types (0: the first segment).
    """
    pad = torch.full((*x.shape[:-1], n), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x], dim=-1)


def prompt_position_ids(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of [P; E[x]]: 0…n-1 for the prompt, the caller's own shifted by n. (..., T) -> (..., n+T)

    Shifting (instead of dropping the caller's positions, as PEFT does) keeps a left-padded row's
    tokens at the positions its mask gives them, so batched generation matches one-by-one.
    """
    virtual = torch.arange(n, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat([virtual.expand(*position_ids.shape[:-1], n), position_ids + n], dim=-1)


def prefix_mlp(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> torch.Tensor:
    """Li & Liang's reparameterisation P = MLP(P') = tanh(P'·W₁ᵀ + b₁)·W₂ᵀ + b₂ (§4.3, PEFT's PrefixEncoder).

    P' (n, k) -> (n, h) -> P (n, L·2·d_kv). Training through it is more stable than training P
    directly; once trained, only P is kept (the MLP is folded away).
    """
    return F.linear(torch.tanh(F.linear(embedding, w1, b1)), w2, b2)


def prefix_key_values(prefix: torch.Tensor, num_layers: int, num_heads: int,
                      head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's key and value prefix from the flat (n, L·2·H·d_h) prefix, in PEFT's file layout.

    The row of virtual token i reads as (2L, H, d_h): index 2l is layer l's key, 2l+1 its value.
    H is the number of key/value heads (H_kv < H_q under grouped-query attention).
    -> L pairs (K_l, V_l), each (H, n, d_h): the cache layout without the batch dimension.
    """
    n = prefix.shape[0]
    kv = prefix.reshape(n, 2 * num_layers, num_heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, n, d_h)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(num_layers)]


# --- ReFT (Wu et al. 2024): low-rank edits of the residual stream at a few prompt positions ------


def loreft_update(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rᵀ(W·h + b − R·h): what LoReFT adds to a hidden state h (eq. 2), Φ(h) = h + this.

    In the r-dimensional subspace spanned by R's orthonormal rows, h's coordinates R·h are replaced
    by W·h + b; outside it h is left alone. h (..., d), R (r, d), W (r, d), b (r,) -> (..., d);
    3·d·r multiply-adds a token.
    """
    return F.linear(F.linear(h, W, b) - F.linear(h, R), R.T)  # (..., r) -> (..., d)


def direft_update(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rᵀ(W·h + b): DiReFT's edit, LoReFT without the orthogonality of R and without the −R·h.

    h (..., d), R (r, d) unconstrained, W (r, d), b (r,) -> (..., d); 2·d·r multiply-adds a token.
    """
    return F.linear(F.linear(h, W, b), R.T)


def reft_windows(real: torch.Tensor, prompt_lengths: torch.Tensor, first: int,
                 last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `first` and the last `last` prompt tokens of each row, as two (B, T) bool masks.

    real (B, T) bool marks the real tokens (the attention mask: padding on either side, or both);
    a row's prompt is its first prompt_lengths[b] real tokens, clipped to the real ones. Each window
    is clipped to the prompt: a prompt shorter than a window lies wholly in it, and the two windows
    overlap when the prompt is shorter than first + last.
    """
    rank = real.long().cumsum(-1) - 1  # (B, T): each real token's index among its row's real tokens
    length = torch.minimum(prompt_lengths.to(rank.device, rank.dtype), real.sum(-1)).unsqueeze(-1)  # (B, 1)
    prompt = real & (rank < length)
    return prompt & (rank < first), prompt & (rank >= length - last)
