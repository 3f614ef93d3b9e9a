"""LoRA, rsLoRA and DoRA checked against the papers' formulas, written here in plain PyTorch.

Everything runs in float64 so that any difference above 1e-10 is a wrong formula, not rounding.
The references below never call `feathertune.functional`: they materialise the full weight
W + s·B·A (or the DoRA weight m·V/‖V‖_row) and run the layer with it.

- LoRA (Hu et al. 2022):     y = x·Wᵀ + b + s·x·Aᵀ·Bᵀ,            s = α/r
- rsLoRA (Kalajdzievski 2023): the same with s = α/√r
- DoRA (Liu et al. 2024):    y = m ⊙ (W + s·B·A)·x / ‖W + s·B·A‖_row + b, the norm a constant
                             in the backward pass (§4.3)
- PiSSA (Meng et al. 2024):  s·B·A starts at the top-r SVD part U_r·S_r·V_rᵀ of W, output unchanged
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feathertune as ft
from feathertune import functional as fn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

DT = torch.float64
TOL = 1e-10
R, ALPHA = 4, 8
KINDS = ["linear", "conv1d", "conv2d", "embedding"]
CONV = dict(stride=2, padding=1, dilation=1)


class Holder(nn.Module):
    """A one-layer model, so that the layer is attached through the public `ft.attach`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def make_base(kind: str, seed: int = 0) -> nn.Module:
    """A float64 layer with every parameter (bias included) random and of unit order."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(7, 5, bias=True)
    elif kind == "conv1d":
        layer = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs; weight stored (in, out) = (7, 5)
    elif kind == "conv2d":
        layer = nn.Conv2d(3, 6, kernel_size=3, **CONV)
    elif kind == "embedding":
        layer = nn.Embedding(11, 6)
    else:
        raise ValueError(kind)
    layer = layer.to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def make_input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind in ("linear", "conv1d"):
        return torch.randn(2, 3, 7, generator=g, dtype=DT)
    if kind == "conv2d":
        return torch.randn(2, 3, 9, 9, generator=g, dtype=DT)
    return torch.randint(0, 11, (2, 5), generator=g)


def attached(kind: str, *, use_rslora=False, use_dora=False, name="default", model=None, seed=0,
             **extra) -> Holder:
    """A Holder with adapter `name` on its layer, and A, B (and magnitude) set to random values."""
    model = model if model is not None else Holder(make_base(kind, seed))
    config = ft.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=["layer"],
                           use_rslora=use_rslora, use_dora=use_dora, **extra)
    ft.attach(model, config, name=name)
    randomise(model.layer.lora[name], seed=seed + 100)
    return model


def randomise(adapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.A.copy_(torch.randn(adapter.A.shape, generator=g, dtype=DT) * 0.5)
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=g, dtype=DT) * 0.5)
        if adapter.magnitude is not None:
            adapter.magnitude.copy_(torch.rand(adapter.magnitude.shape, generator=g, dtype=DT) * 3 + 0.5)


def scale(use_rslora: bool) -> float:
    return ALPHA / math.sqrt(R) if use_rslora else ALPHA / R


# --- the reference, from the papers ----------------------------------------------------------

def weight_out_in(kind: str, base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in, ...): Conv1D and Embedding store it transposed."""
    W = base.weight.detach()
    return W.T if kind in ("conv1d", "embedding") else W


def delta_ref(kind: str, A, B, s) -> torch.Tensor:
    """s·B·A as an (out, in, ...) weight."""
    if kind == "conv2d":  # B (out, r, 1, 1), A (r, in, kh, kw): contract over r only
        return s * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    return s * (B @ A)


def effective_weight_ref(kind, base, A, B, s, magnitude=None, detach_norm=False) -> torch.Tensor:
    """W + s·B·A, or DoRA's m·(W + s·B·A)/‖W + s·B·A‖_row, as an (out, in, ...) weight."""
    V = weight_out_in(kind, base) + delta_ref(kind, A, B, s)
    if magnitude is None:
        return V
    norm = torch.sqrt((V.reshape(V.shape[0], -1) ** 2).sum(dim=1))
    if detach_norm:
        norm = norm.detach()
    col = (magnitude.reshape(-1) / norm).reshape(-1, *([1] * (V.dim() - 1)))
    return col * V


def forward_ref(kind, base, x, A, B, s, magnitude=None, detach_norm=False) -> torch.Tensor:
    bias = getattr(base, "bias", None)
    if kind in ("linear", "conv1d"):
        W = weight_out_in(kind, base)
        if magnitude is None:  # the factored form of the LoRA paper
            return x @ W.T + bias + s * (x @ A.T) @ B.T
        return x @ effective_weight_ref(kind, base, A, B, s, magnitude, detach_norm).T + bias
    if kind == "conv2d":
        W_eff = effective_weight_ref(kind, base, A, B, s, magnitude, detach_norm)
        return F.conv2d(x, W_eff, bias, **CONV)
    assert magnitude is None
    table = base.weight.detach() + delta_ref(kind, A, B, s).T  # rows of W + s·(B·A)ᵀ
    return table[x]


def stored_layout(kind: str, W_out_in: torch.Tensor) -> torch.Tensor:
    return W_out_in.T if kind in ("conv1d", "embedding") else W_out_in


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach() - b.detach()).abs().max().item()


def check(got: torch.Tensor, want: torch.Tensor, what: str = "", tol: float = TOL) -> None:
    """got == want within `tol` (absolute, elementwise), with a short message if not."""
    diff = max_diff(got, want)
    assert diff <= tol, f"{what or 'values'} differ by {diff:.3e} (tolerance {tol:.0e})"


CASES = [(k, rs, dora) for k in KINDS for rs in (False, True) for dora in (False, True)
         if not (k == "embedding" and dora)]
CASE_IDS = [f"{k}-{'rslora' if rs else 'lora'}{'-dora' if d else ''}" for k, rs, d in CASES]
DORA_KINDS = ["linear", "conv1d", "conv2d"]


# --- forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,use_rslora,use_dora", CASES, ids=CASE_IDS)
def test_forward_matches_paper_formula(kind, use_rslora, use_dora):
    model = attached(kind, use_rslora=use_rslora, use_dora=use_dora)
    ad = model.layer.lora["default"]
    assert ad.A.dtype == DT and ad.B.dtype == DT
    assert ad.scale == pytest.approx(scale(use_rslora), rel=1e-15)
    x = make_input(kind)
    with torch.no_grad():
        got = model(x)
        want = forward_ref(kind, model.layer.base, x, ad.A, ad.B, scale(use_rslora),
                           ad.magnitude if use_dora else None)
        base_out = model.layer.base(x)
    assert got.dtype == DT
    check(got, want)
    assert max_diff(got, base_out) > 1e-2  # the adapter really changes the output


def test_adapter_shapes_follow_peft_layout():
    shapes = {}
    for kind, dora in [("linear", True), ("conv1d", True), ("conv2d", True), ("embedding", False)]:
        ad = attached(kind, use_dora=dora).layer.lora["default"]
        shapes[kind] = (tuple(ad.A.shape), tuple(ad.B.shape),
                        None if ad.magnitude is None else tuple(ad.magnitude.shape))
    assert shapes == {
        "linear": ((R, 7), (5, R), (5,)),
        "conv1d": ((R, 7), (5, R), (5,)),
        "conv2d": ((R, 3, 3, 3), (6, R, 1, 1), (1, 6, 1, 1)),
        "embedding": ((R, 11), (6, R), None),
    }


def test_dora_on_embedding_is_refused():
    with pytest.raises(ft.ConfigError, match="DoRA on nn.Embedding"):
        attached("embedding", use_dora=True)


def test_dora_magnitude_starts_at_row_norm_and_output_at_base():
    """With B = 0 (default init), DoRA's m = ‖W‖_row and the model is exactly the base."""
    for kind in DORA_KINDS:
        model = Holder(make_base(kind))
        ft.attach(model, ft.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=["layer"],
                                       use_dora=True))
        ad = model.layer.lora["default"]
        W = weight_out_in(kind, model.layer.base)
        check(ad.magnitude.detach().reshape(-1), W.reshape(W.shape[0], -1).norm(dim=1))
        x = make_input(kind)
        with torch.no_grad():
            check(model(x), model.layer.base(x))


# --- DoRA's norm and gradient ---------------------------------------------------------------

@pytest.mark.parametrize("shape", ["linear", "conv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dora_row_norm_closed_form_equals_materialised(shape, seed):
    g = torch.Generator().manual_seed(seed)
    r = 3 + seed
    if shape == "linear":
        W = torch.randn(9, 13, generator=g, dtype=DT)
        A = torch.randn(r, 13, generator=g, dtype=DT)
        B = torch.randn(9, r, generator=g, dtype=DT)
        V = W + 1.7 * (B @ A)
    else:
        W = torch.randn(6, 4, 3, 3, generator=g, dtype=DT)
        A = torch.randn(r, 4, 3, 3, generator=g, dtype=DT)
        B = torch.randn(6, r, 1, 1, generator=g, dtype=DT)
        V = W + 1.7 * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    want = torch.sqrt((V.reshape(V.shape[0], -1) ** 2).sum(dim=1))
    got = fn.dora_row_norm(W, A, B, 1.7)
    assert got.dtype == DT
    check(got, want)
    # with ‖W‖² supplied by the caller (the cached path)
    w_sq = (W.reshape(W.shape[0], -1) ** 2).sum(dim=1)
    check(fn.dora_row_norm(W, A, B, 1.7, w_sq_norm=w_sq), want)


@pytest.mark.parametrize("kind", DORA_KINDS)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_dora_gradient_treats_norm_as_constant(kind, use_rslora):
    model = attached(kind, use_rslora=use_rslora, use_dora=True)
    ad = model.layer.lora["default"]
    x = make_input(kind)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    (out * g).sum().backward()

    s = scale(use_rslora)
    leaves = [t.detach().clone().requires_grad_(True) for t in (ad.A, ad.B, ad.magnitude)]
    want = torch.autograd.grad((forward_ref(kind, model.layer.base, x, *leaves[:2], s, leaves[2],
                                            detach_norm=True) * g).sum(), leaves)
    for label, param, ref in zip(("A", "B", "magnitude"), (ad.A, ad.B, ad.magnitude), want):
        assert param.grad is not None, label
        check(param.grad, ref, label)
    # The base stays frozen.
    assert all(not p.requires_grad and p.grad is None for p in model.layer.base.parameters())
    # The check can tell: differentiating through the norm gives a different gradient for A.
    through = torch.autograd.grad((forward_ref(kind, model.layer.base, x, *leaves[:2], s, leaves[2])
                                   * g).sum(), leaves[0])[0]
    assert max_diff(through, want[0]) > 1e-6


def test_lora_gradient_matches_reference():
    model = attached("linear")
    ad = model.layer.lora["default"]
    x = make_input("linear")
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    (out * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (ad.A, ad.B)]
    want = torch.autograd.grad((forward_ref("linear", model.layer.base, x, *leaves, scale(False)) * g).sum(),
                               leaves)
    check(ad.A.grad, want[0])
    check(ad.B.grad, want[1])


# --- merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,use_rslora,use_dora", CASES, ids=CASE_IDS)
def test_merged_weight_equals_reference(kind, use_rslora, use_dora):
    model = attached(kind, use_rslora=use_rslora, use_dora=use_dora)
    ad = model.layer.lora["default"]
    base = model.layer.base
    with torch.no_grad():
        want = effective_weight_ref(kind, base, ad.A, ad.B, scale(use_rslora),
                                    ad.magnitude if use_dora else None)
        bias_before = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
        x = make_input(kind)
        out_before = model(x)
    merged = ft.merge(model)  # unload: plain layer back in place
    assert merged is model
    assert type(model.layer) is type(base)
    check(model.layer.weight.detach(), stored_layout(kind, want))
    if bias_before is not None:
        assert torch.equal(model.layer.bias.detach(), bias_before)
    with torch.no_grad():
        check(model(x), out_before)


# --- initialisations ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_pissa_starts_at_top_r_svd_and_at_base(kind, use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(DT) if kind == "linear" else Conv1D(12, 16).to(DT)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    model = Holder(base)
    ft.attach(model, ft.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=["layer"],
                                   init="pissa", use_rslora=use_rslora))
    ad = model.layer.lora["default"]
    s = scale(use_rslora)
    W = weight_out_in(kind, base)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1), dtype=DT)

    with torch.no_grad():
        check(model(x), base(x), "PiSSA output at init vs base")
        check(s * ad.B @ ad.A, top, "PiSSA s·B·A vs float64 U_r·S_r·V_rᵀ of W")
        # After training moves A and B, the model is the residual W − U_r·S_r·V_rᵀ plus s·B·A.
        randomise(ad, seed=5)
        want = x @ (W - top).T + base.bias + s * (x @ ad.A.T) @ ad.B.T
        check(model(x), want, "PiSSA output after training vs residual + s·B·A")


def test_gaussian_init():
    torch.manual_seed(0)
    model = Holder(nn.Linear(512, 64).to(DT))
    ft.attach(model, ft.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=["layer"], init="gaussian"))
    ad = model.layer.lora["default"]
    assert torch.count_nonzero(ad.B) == 0
    A = ad.A.detach()
    assert abs(A.std().item() - 1 / R) < 0.1 / R  # 2048 samples: sampling error ≈ 1.6 %
    assert abs(A.mean().item()) < 0.1 / R
    x = torch.randn(3, 512, dtype=DT)
    with torch.no_grad():
        check(model(x), model.layer.base(x))


def test_default_init_starts_at_base():
    for kind in KINDS:
        model = Holder(make_base(kind))
        ft.attach(model, ft.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=["layer"]))
        ad = model.layer.lora["default"]
        zero, rand = (ad.A, ad.B) if kind == "embedding" else (ad.B, ad.A)  # PEFT: embeddings swap
        assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(rand) > 0, kind
        x = make_input(kind)
        with torch.no_grad():
            assert torch.equal(model(x), model.layer.base(x)), kind


# --- two adapters: merge, unmerge -----------------------------------------------------------

PAIRS = [(False, False), (False, True), (True, True)]
PAIR_CASES = [(k, p) for k in KINDS for p in PAIRS if not (k == "embedding" and any(p))]


@pytest.mark.parametrize("kind,pair", PAIR_CASES,
                         ids=[f"{k}-{'+'.join('dora' if d else 'lora' for d in p)}" for k, p in PAIR_CASES])
def test_two_adapters_merge_then_unmerge_restores_base(kind, pair):
    model = attached(kind, use_dora=pair[0], name="one", seed=0)
    attached(kind, use_dora=pair[1], name="two", model=model, seed=1)
    ft.set_active(model, ["one", "two"])
    layer = model.layer
    W0 = layer.base.weight.detach().clone()
    b0 = None if getattr(layer.base, "bias", None) is None else layer.base.bias.detach().clone()
    x = make_input(kind)
    with torch.no_grad():
        both = model(x)
        # The outputs of the two active adapters add up.
        ft.set_active(model, ["one"])
        one = model(x)
        ft.set_active(model, ["two"])
        two = model(x)
        with ft.disabled(model):
            base = model(x)
        check(both, one + two - base)
        ft.set_active(model, ["one", "two"])

    ft.merge(model, unload=False)
    assert layer.is_merged()
    assert max_diff(layer.base.weight.detach(), W0) > 1e-2
    with torch.no_grad():
        check(model(x), both)  # the merged weights compute the same thing
        with ft.disabled(model):  # disabling undoes the merge meanwhile
            check(model(x), base)
        check(model(x), both)
    ft.unmerge(model)
    assert not layer.is_merged()
    check(layer.base.weight.detach(), W0)
    if b0 is not None:
        assert torch.equal(layer.base.bias.detach(), b0)
    with torch.no_grad():
        check(model(x), both)


def test_single_dora_merge_then_unmerge_restores_base_conv1d():
    model = attached("conv1d", use_dora=True)
    W0 = model.layer.base.weight.detach().clone()
    ft.merge(model, unload=False)
    ft.unmerge(model)
    check(model.layer.base.weight.detach(), W0)
