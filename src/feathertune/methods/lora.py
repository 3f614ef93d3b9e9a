"""LoRA, rsLoRA and DoRA.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"):

    h = W·x + s·B·A·x,   s = α/r,   A ∈ ℝ^{r×in} random,  B ∈ ℝ^{out×r} zero

so the model starts exactly at the base and only A and B (r·(in+out) numbers) train.
rsLoRA (Kalajdzievski 2023) uses s = α/√r. DoRA (Liu et al. 2024) splits the weight into a
learned magnitude and a direction:

    h = m · (W + s·B·A)·x / ‖W + s·B·A‖_row,   m initialised to ‖W‖_row

with the norm treated as a constant in the backward pass (§4.3). The math is in `functional`;
this file holds the config, the layer wrappers and `attach_lora`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from feathertune import functional as fn
from feathertune import quant
from feathertune.config import MethodConfig, names_problem, positive_int, type_problem
from feathertune.errors import ConfigError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.saved_modules import ModulesToSave
from feathertune.targeting import find_targets, hf_conv1d_class, pattern_key
from feathertune.wrapping import WrappedLayer, site_at

INITS = ("default", "gaussian", "pissa")
BIASES = ("none", "lora_only")
# PEFT's tensor name after "<module path>." for each LoraAdapter field (lora_peft reads the rest).
TENSOR_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
                   "bias": "base_layer.bias"}
EMBEDDING_SUFFIXES = {**TENSOR_SUFFIXES, "A": "lora_embedding_A", "B": "lora_embedding_B"}


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """Where LoRA goes and how it is scaled. Defaults follow common practice from the papers."""

    method: ClassVar[str] = "lora"

    r: int = 8  # rank of B·A; the paper finds 4–8 already captures most of the update
    alpha: float = 16  # s = alpha / r; 2·r is the usual choice, so that s = 2
    dropout: float = 0.05  # on the adapter's input only; QLoRA uses 0.05–0.1
    # list: exact name or dotted suffix; str: regex on the full name; "all-linear": every linear
    # layer but the output head (QLoRA: adapting all of them matches full fine-tuning).
    target_modules: str | list[str] = "all-linear"
    layers: list[int] | None = None  # only these block indices (None: all)
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # regex -> r
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)  # regex -> alpha
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # trained in full, saved too
    init: str = "default"  # "default": A Kaiming, B 0; "gaussian": A ~ N(0, 1/r); "pissa": top-r SVD
    use_rslora: bool = False  # s = alpha / sqrt(r)
    use_dora: bool = False  # magnitude × direction
    bias: str = "none"  # "lora_only": also train the biases of the adapted layers

    def problems(self) -> list[str]:
        found = positive_int("r", self.r, "4, 8, 16, 64")
        found += type_problem("alpha", self.alpha, (int, float), "a positive number")
        if isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha <= 0:
            found.append(f"alpha={self.alpha} must be positive (typical: 2·r)")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0 <= self.dropout < 1:
            found.append(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                import re
                try:
                    re.compile(self.target_modules)
                except re.error as exc:
                    found.append(f"target_modules={self.target_modules!r} is not a valid regular "
                                 f"expression ({exc}); give a list of names or 'all-linear'")
        elif not isinstance(self.target_modules, (list, tuple)) or not self.target_modules \
                or not all(isinstance(t, str) and t for t in self.target_modules):
            found.append(f"target_modules={self.target_modules!r} must be a non-empty list of module "
                         f"names, a regular expression, or 'all-linear'")
        if self.layers is not None and (not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
            found.append(f"layers={self.layers!r} must be a list of block indices (integers ≥ 0) or None")
        patterns = {}
        for field in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, field)
            if isinstance(value, dict):
                patterns[field] = value
            else:
                found.append(f"{field}={value!r} must be a mapping of name regex -> value, e.g. {{'v_proj': 4}}")
        for key, value in patterns.get("rank_pattern", {}).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                found.append(f"rank_pattern[{key!r}]={value!r} must be a positive integer")
        for key, value in patterns.get("alpha_pattern", {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                found.append(f"alpha_pattern[{key!r}]={value!r} must be a positive number")
        found += names_problem("modules_to_save", self.modules_to_save)
        if self.init not in INITS:
            found.append(f"init={self.init!r} is not one of {', '.join(INITS)}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                found.append(f"{flag}={getattr(self, flag)!r} must be true or false")
        if self.bias not in BIASES:
            found.append(f"bias={self.bias!r} is not one of {', '.join(BIASES)}")
        if self.init == "pissa" and self.use_dora is True:
            found.append("init='pissa' with use_dora=true is not supported; choose one of them")
        return found

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """This module's (r, alpha), after rank_pattern / alpha_pattern."""
        r_key = pattern_key(self.rank_pattern, module_name)
        a_key = pattern_key(self.alpha_pattern, module_name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.alpha
        return r, alpha


class LoraAdapter(nn.Module):
    """One named LoRA adapter's tensors on one layer, in PEFT's storage layout (see functional)."""

    def __init__(self, a_shape, b_shape, scale: float, dropout: float, *, magnitude_shape=None,
                 bias: torch.Tensor | None = None, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.zeros(a_shape, **kw))
        self.B = nn.Parameter(torch.zeros(b_shape, **kw))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = nn.Parameter(torch.ones(magnitude_shape, **kw)) if magnitude_shape else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        # PiSSA keeps its starting factors frozen and subtracts them, so the base stays untouched.
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the whole update; with PiSSA, [A; A0] and [B, −B0] (rank 2r)."""
        if self.A0 is None:
            return self.A, self.B
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)


class LoraLayer(WrappedLayer):
    """Carries named LoRA adapters around one base layer. Subclasses say how the base computes."""

    needs_attention_mask = False  # a function of each position's input alone

    channel_dim = -1  # where output features sit in the base's output

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.lora = nn.ModuleDict()
        self._merged: dict[str, Any] | None = None  # what merge() folded in, to undo it exactly
        self._sq_norm_cache: tuple[tuple, torch.Tensor] | None = None

    # --- what subclasses provide -------------------------------------------------------------
    def weight_param(self) -> nn.Parameter:
        return self.base.weight

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in, ...), a view of the parameter."""
        return self.weight_param()

    def set_base_weight_(self, new: torch.Tensor) -> None:
        self.weight_param().data.copy_(new.to(self.weight_param().dtype))

    def write_base_weight_(self, new: torch.Tensor) -> None:
        """Write the base weight (merge/unmerge) and forget the cached ‖W‖², which `.data` writes
        would not invalidate through the tensor's version counter."""
        self.set_base_weight_(new)
        self._sq_norm_cache = None

    def adapter_shapes(self, r: int) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def lora_forward(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- adapters ----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.lora.keys())

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig, init: bool = True) -> None:
        a_shape, b_shape = self.adapter_shapes(r)
        W = self.base_weight()
        magnitude_shape = self.magnitude_shape() if config.use_dora else None
        bias = getattr(self.base, "bias", None) if config.bias == "lora_only" else None
        adapter = LoraAdapter(a_shape, b_shape, fn.lora_scale(alpha, r, config.use_rslora),
                              config.dropout, magnitude_shape=magnitude_shape, bias=bias,
                              dtype=W.dtype if W.is_floating_point() else torch.float32, device=W.device)
        if init:
            self.initialise(adapter, config.init)
        adapter.train(self.base.training)  # new modules start in train mode; follow the model's
        self.lora[name] = adapter

    def initialise(self, adapter: LoraAdapter, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(adapter.A, std=1 / adapter.rank)
            elif init == "pissa":
                self.pissa_init(adapter)
            else:  # Kaiming-uniform as nn.Linear does, so that A·x has unit-order variance
                nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))
            if init != "pissa":
                nn.init.zeros_(adapter.B)
            if adapter.magnitude is not None:
                adapter.magnitude.copy_(self.dora_norm(adapter).reshape(adapter.magnitude.shape))

    def pissa_init(self, adapter: LoraAdapter) -> None:
        """PiSSA (Meng et al. 2024): start B·A at the top-r singular triplets of W."""
        raise ConfigError(f"init='pissa' needs a linear layer, not {type(self.base).__name__}")

    def magnitude_shape(self) -> tuple:
        return (self.base_weight().shape[0],)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.lora[name].parameters()) if name in self.lora else []

    def delete_adapter(self, name: str) -> None:
        del self.lora[name]
        self.active = [n for n in self.active if n != name]

    # --- files -------------------------------------------------------------------------------
    def suffixes(self) -> dict[str, str]:
        return TENSOR_SUFFIXES

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        adapter = self.lora[name]
        A, B = adapter.factors()  # PiSSA's frozen start is folded in as extra rank
        found = {"A": A, "B": B, "magnitude": adapter.magnitude, "bias": adapter.bias}
        return {f"{PREFIX}{path}.{self.suffixes()[k]}": v for k, v in found.items() if v is not None}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of file_tensors: PiSSA's [A; A0], [B, −B0] are split back when resuming its run."""
        adapter = self.lora[name]
        key = {field: f"{PREFIX}{path}.{suffix}" for field, suffix in self.suffixes().items()}
        A, B, r = tensors[key["A"]], tensors[key["B"]], adapter.rank
        adapter.A.copy_(A[:r])
        adapter.B.copy_(B[:, :r])
        if adapter.A0 is not None:  # the frozen starting factors travel in the file as the extra rank
            adapter.A0.copy_(A[r:])
            adapter.B0.copy_(-B[:, r:])
        for field in ("magnitude", "bias"):
            if getattr(adapter, field) is not None:
                getattr(adapter, field).copy_(tensors[key[field]])

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = self.base(x, *args, **kwargs)
        if self.disabled or self._merged is not None:
            return base_out
        if self.context.adapter_names is not None:
            return self.mixed_batch_forward(x, base_out)
        out = base_out
        for name in self.active:
            if name in self.lora:
                out = out + self.update(self.lora[name], x, base_out)
        return out

    def mixed_batch_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Each row of the batch gets its own adapter (or none): one forward for many users."""
        out = base_out
        for name, rows in self.rows_by_adapter(x.shape[0]).items():
            if name in self.lora:
                out = out.index_add(0, rows, self.update(self.lora[name], x[rows], base_out[rows]))
        return out

    def update(self, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the base output."""
        lora_out = self.lora_forward(adapter, x).to(base_out.dtype)
        bias = getattr(self.base, "bias", None)
        if adapter.magnitude is not None:
            with torch.no_grad():  # detached norm, DoRA §4.3
                norm = self.dora_norm(adapter)
            no_bias = base_out if bias is None else base_out - self.broadcast(bias, base_out)
            ratio = fn.dora_ratio(adapter.magnitude.to(base_out.dtype), norm.to(base_out.dtype))
            delta = fn.dora_update(no_bias, lora_out, ratio, self.channel_dim)
        else:
            delta = lora_out
        if adapter.bias is not None and bias is not None:
            delta = delta + self.broadcast(adapter.bias - bias, base_out)
        return delta

    def broadcast(self, per_channel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[self.channel_dim] = -1
        return per_channel.to(like.dtype).reshape(shape)

    def dora_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, with ‖W‖² cached until the base weight changes."""
        W = self.base_weight()
        param = self.weight_param()
        key = (param.data_ptr(), param._version, W.dtype, W.device)
        if self._sq_norm_cache is None or self._sq_norm_cache[0] != key:
            self._sq_norm_cache = (key, fn.squared_row_norm(W.detach().to(adapter.A.dtype)))
        A, B = adapter.factors()
        return fn.dora_row_norm(W.detach().to(A.dtype), A, B, adapter.scale, self._sq_norm_cache[1])

    # --- merging -----------------------------------------------------------------------------
    def is_merged(self) -> bool:
        return self._merged is not None

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W·Π + Σ cᵢ·sᵢ·Bᵢ·Aᵢ, with cᵢ = mᵢ/‖W + sᵢ·Bᵢ·Aᵢ‖ for DoRA and 1 for LoRA, Π = 1 + Σ(cᵢ − 1).

        The row scales cᵢ and the original biases are kept, so `unmerge` inverts this exactly.
        """
        names = [n for n in self.active if n in self.lora]
        if self._merged is not None or not names:
            return
        if quant.is_quantized(self.base):
            warnings.warn("merging into a 4-bit (NF4) base rounds the merged weights to NF4, and unmerging "
                          "cannot undo that rounding exactly; for a full-precision export use "
                          "`feathertune merge --dequantize` (or ft.quant.dequantize_model first)", stacklevel=4)
        W = self.base_weight()
        work = torch.promote_types(W.dtype, torch.float32)
        W32 = W.to(work)
        row_scales = {n: fn.dora_ratio(self.lora[n].magnitude.to(work), self.dora_norm(self.lora[n]).to(work))
                      for n in names if self.lora[n].magnitude is not None}
        self.write_base_weight_(fn.merged_weight(W32, self.merge_updates(names, row_scales, W32.dtype)))
        bias = getattr(self.base, "bias", None)
        original_bias = None
        if bias is not None and any(self.lora[n].bias is not None for n in names):
            original_bias = bias.detach().clone()
            bias.data += sum(self.lora[n].bias - original_bias for n in names if self.lora[n].bias is not None)
        self._merged = {"names": names, "row_scales": row_scales, "bias": original_bias}

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        names, row_scales = self._merged["names"], self._merged["row_scales"]
        W = self.base_weight()
        work = torch.promote_types(W.dtype, torch.float32)
        updates = self.merge_updates(names, row_scales, work)
        self.write_base_weight_(fn.unmerged_weight(W.to(work), updates))
        if self._merged["bias"] is not None:
            self.base.bias.data.copy_(self._merged["bias"])
        self._merged = None

    def merge_updates(self, names, row_scales, dtype) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(s·B·A as a weight, DoRA's row scale or None) per adapter, for fn.merged_weight."""
        updates = []
        for n in names:
            A, B = self.lora[n].factors()
            updates.append((self.delta_weight(A.to(dtype), B.to(dtype), self.lora[n].scale), row_scales.get(n)))
        return updates

    def delta_weight(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        return fn.lora_delta_weight(A, B, scale)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, or on HF's Conv1D whose weight is stored transposed (in, out)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        conv1d = hf_conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base, conv1d)

    def base_weight(self) -> torch.Tensor:
        if quant.is_quantized(self.base):  # QLoRA: the frozen base is 4-bit; the maths sees W itself
            return quant.dequantize_weight(self.base)
        W = self.weight_param()
        return W.T if self.fan_in_fan_out else W

    def set_base_weight_(self, new: torch.Tensor) -> None:
        if quant.is_quantized(self.base):
            quant.requantize_weight_(self.base, new)  # merging into NF4 rounds: see LoraLayer.merge
            return
        new = new.T if self.fan_in_fan_out else new
        self.weight_param().data.copy_(new.to(self.weight_param().dtype))

    def adapter_shapes(self, r: int):
        out_features, in_features = self.base_weight().shape
        return (r, in_features), (out_features, r)

    def lora_forward(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        A, B = adapter.factors()
        return fn.lora_linear(adapter.dropout(x.to(A.dtype)), A, B, adapter.scale)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._lone_plain_adapter()
        if adapter is None:  # DoRA, several adapters, a mixed batch, merged, disabled: the general path
            return super().forward(x, *args, **kwargs)
        # The common case in two operations after the base's instead of four: base + s·(x·Aᵀ)·Bᵀ as one
        # addmm. Per token in a decode step, that dispatch overhead, not the FLOPs, is LoRA's cost.
        base_out = self.base(x, *args, **kwargs)
        middle = F.linear(adapter.dropout(x), adapter.A)  # (..., r)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), middle.reshape(-1, middle.shape[-1]),
                          adapter.B.T, alpha=adapter.scale)
        return out.view(base_out.shape)

    def _lone_plain_adapter(self) -> LoraAdapter | None:
        """The one active adapter if it is plain LoRA in the base's dtype (no DoRA, bias or PiSSA)."""
        if self.disabled or self._merged is not None or self.context.adapter_names is not None \
                or len(self.active) != 1 or self.fan_in_fan_out or quant.is_quantized(self.base):
            return None
        adapter = self.lora[self.active[0]] if self.active[0] in self.lora else None
        if adapter is None or adapter.magnitude is not None or adapter.bias is not None or adapter.A0 is not None:
            return None
        return adapter if adapter.A.dtype == self.base.weight.dtype else None

    def pissa_init(self, adapter: LoraAdapter) -> None:
        W = self.base_weight().detach()
        W = W.to(torch.promote_types(W.dtype, torch.float32))  # SVD in at least fp32, fp64 stays fp64
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = adapter.rank
        root = (S[:r] / adapter.scale).sqrt()  # split √(S/s) to each side: s·B·A = U_r·S_r·V_rᵀ
        adapter.A.copy_((root[:, None] * Vh[:r]).to(adapter.A.dtype))
        adapter.B.copy_((U[:, :r] * root[None, :]).to(adapter.B.dtype))
        adapter.A0 = adapter.A.detach().clone()
        adapter.B0 = adapter.B.detach().clone()


class LoraConv2d(LoraLayer):
    """LoRA on nn.Conv2d: A is a conv with the base's kernel into r channels, B a 1×1 conv."""

    channel_dim = 1

    def adapter_shapes(self, r: int):
        out_channels, in_channels, kh, kw = self.base.weight.shape
        return (r, in_channels, kh, kw), (out_channels, r, 1, 1)

    def magnitude_shape(self) -> tuple:
        return (1, self.base.weight.shape[0], 1, 1)  # PEFT's layout for conv DoRA

    def lora_forward(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        A, B = adapter.factors()
        conv = self.base
        return fn.lora_conv2d(adapter.dropout(x.to(A.dtype)), A, B, adapter.scale,
                              conv.stride, conv.padding, conv.dilation)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding. As in PEFT, A starts at zero and B random (the lookup is on A)."""

    def base_weight(self) -> torch.Tensor:
        return self.base.weight.T  # (dim, num_embeddings): 'out' is the embedding dimension

    def set_base_weight_(self, new: torch.Tensor) -> None:
        self.base.weight.data.copy_(new.T.to(self.base.weight.dtype))

    def adapter_shapes(self, r: int):
        num_embeddings, dim = self.base.weight.shape
        return (r, num_embeddings), (dim, r)

    def suffixes(self) -> dict[str, str]:
        return EMBEDDING_SUFFIXES

    def initialise(self, adapter: LoraAdapter, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(adapter.A)
            nn.init.normal_(adapter.B)

    def lora_forward(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        A, B = adapter.factors()
        return fn.lora_embedding(x, A, B, adapter.scale, self.base.padding_idx)


def _layer_class(module: nn.Module) -> type[LoraLayer] | None:
    if isinstance(module, LoraLayer):
        return type(module)
    if isinstance(module, nn.Linear):
        return LoraLinear
    conv1d = hf_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return LoraLinear
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None


SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d, nn.Embedding"


def _check_layer(name: str, module: nn.Module, config: LoraConfig) -> list[str]:
    """Problems with putting this config's LoRA on this particular layer."""
    base = module.base if isinstance(module, LoraLayer) else module
    found = []
    if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
        found.append(f"{name}: Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r} "
                     f"is not supported (LoRA needs groups=1 and zero padding)")
    if isinstance(base, nn.Embedding) and config.use_dora:
        found.append(f"{name}: DoRA on nn.Embedding is not supported; leave embeddings out of "
                     f"target_modules or set use_dora=false")
    if config.init == "pissa" and _layer_class(base) is not LoraLinear:
        found.append(f"{name}: init='pissa' needs a linear layer, not {type(base).__name__}")
    return found


def attach_lora(model: nn.Module, config: LoraConfig, name: str, *, init: bool = True,
                plan: FilePlan | None = None) -> list[str]:
    """Wrap the targeted layers of `model` (in place) and add adapter `name` to each.

    Args:
        init: False leaves the factors at zero, to be filled from a file.
        plan: from a file: the modules to adapt (instead of resolving `config.target_modules`) and
            their ranks (`plan.sizes`, overriding the config where the file's shapes say so).

    Returns:
        The full names of the adapted modules.
    """
    targets, ranks = (plan.targets, plan.sizes) if plan is not None else (None, {})
    if targets is None:
        saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
        targets = find_targets(model, config.target_modules, layers=config.layers,
                               exclude=list(config.modules_to_save) + saved, supported=lambda m: _layer_class(m) is not None,
                               supported_names=SUPPORTED)
    problems = [p for t in targets for p in _check_layer(t, model.get_submodule(t), config)]
    if problems:
        raise ConfigError(problems, source="LoraConfig on this model")
    for target in targets:
        module = site_at(model, target, LoraLayer, make=lambda m: _layer_class(m)(m))
        r, alpha = config.rank_and_alpha(target)
        r = ranks.get(target, r)
        module.add_adapter(name, r, alpha, config, init=init)
    return targets
