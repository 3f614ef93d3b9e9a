"""ReFT: representation fine-tuning, low-rank edits of the residual stream at a few prompt positions.

Wu et al. 2024, "ReFT: Representation Finetuning for Language Models". The model stays frozen; at
chosen blocks, the hidden state h ∈ ℝ^d that the block writes to the residual stream is edited at
chosen positions only:

    LoReFT (eq. 2):  Φ(h) = h + Rᵀ(W·h + b − R·h),   R ∈ ℝ^{r×d} orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝ^r
    DiReFT:          Φ(h) = h + Rᵀ(W·h + b),         R unconstrained, same shapes

LoReFT replaces h's coordinates in the subspace spanned by R's rows by W·h + b and leaves the rest of
h alone. R stays orthonormal throughout training through torch's orthogonal parametrisation, not a
penalty (see `keep_orthonormal`). Each intervention trains 2·d·r + r numbers; R starts as a random
orthonormal matrix, W and b as nn.Linear's default (as pyreft), so the model differs from the base
from the start.

Positions ("f7+l7": the first 7 and the last 7 prompt tokens; "f7"; "l7"). A row's prompt is its
real tokens (attention mask 1; padding on the left or the right) up to `prompt_lengths`, a keyword
argument of the model's forward (the training loop passes the tokens before each row's first
supervised one); without it every real token is the prompt. Each window is clipped to the prompt.
Where the windows overlap (a prompt shorter than the two together), a position gets the first
window's edit and then the last one's, Φ_last(Φ_first(h)); with share_weights one intervention
serves both windows and edits each position once. In generation the prefill edits the prompt and
cached decode steps edit nothing (nor does any forward that continues a KV cache): every new token
reads the edited prompt through the cache, as a full recompute with prompt_lengths does.

`dropout` drops entries of the edit Rᵀ(…) before it is added (in training only); h itself, the frozen
residual stream, is never dropped. Several active adapters each read the same h and their edits add
up; in a mixed batch each row gets its own adapter's. Not mergeable: the edit depends on the
position. transformers' `output_hidden_states` records each block's own output, before the edit;
the next block reads the edited one.

File (feathertune's own, peft_type "REFT"): adapter_config.json holds the config, with `layers` as
the exact block indices; adapter_model.safetensors holds, per block and window (`first`, `last`, or
`shared` with share_weights), `base_model.model.<block path>.reft.<window>.R` (r, d) — R itself,
orthonormal, not the parametrisation's internal tensor; float64 for LoReFT, see `ReftIntervention` —
`.W` (r, d) and `.b` (r,).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.config import MethodConfig, names_problem, positive_int
from feathertune.errors import ConfigError, TargetError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.targeting import block_names
from feathertune.wrapping import WrappedLayer, site_at

PEFT_TYPE = "REFT"
KINDS = ("loreft", "direft")
WINDOWS = ("first", "last", "shared")  # which positions an intervention edits
TENSORS = ("R", "W", "b")
SUFFIXES = tuple(f"reft.{window}.{tensor}" for window in WINDOWS for tensor in TENSORS)
_POSITIONS = re.compile(r"f([1-9]\d*)(?:\+l([1-9]\d*))?|l([1-9]\d*)")  # fK, fK+lK, lK with K ≥ 1


def parse_positions(text: Any) -> tuple[int, int] | None:
    """'f7+l7' -> (7, 7), 'f3' -> (3, 0), 'l5' -> (0, 5): (first K, last K); None if malformed."""
    match = _POSITIONS.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    first, last_after_first, last = match.groups()
    return int(first or 0), int(last_after_first or last or 0)


@dataclasses.dataclass
class ReftConfig(MethodConfig):
    """Which blocks, which prompt positions, what rank. Defaults: LoReFT of rank 4 on the first and
    last 7 prompt tokens at every block, one intervention per window."""

    method: ClassVar[str] = "reft"

    kind: str = "loreft"  # "loreft": orthonormal R, h + Rᵀ(W·h + b − R·h); "direft": free R, h + Rᵀ(W·h + b)
    r: int = 4  # the rank of the edited subspace
    layers: str | list[int] = "all"  # "all", or the block indices to edit (0 is the lowest block)
    positions: str = "f7+l7"  # "fK": the first K prompt tokens, "lK": the last K, "fK+lK": both
    share_weights: bool = False  # True: one intervention for both windows; False: one per window
    dropout: float = 0.0  # on the edit Rᵀ(…) before it is added, in training only (never on h itself)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # e.g. a classifier head, trained whole

    def problems(self) -> list[str]:
        found = []
        if self.kind not in KINDS:
            found.append(f"kind={self.kind!r} is not one of {', '.join(KINDS)} (loreft: R kept orthonormal, "
                         f"the paper's method; direft: R unconstrained, no −R·h term)")
        found += positive_int("r", self.r, "1 to 8")
        found += _layers_problem(self.layers)
        if parse_positions(self.positions) is None:
            found.append(f"positions={self.positions!r} must be 'fK' (the first K prompt tokens), 'lK' (the "
                         f"last K) or 'fK+lK' (both), each K ≥ 1, e.g. 'f7+l7'")
        if not isinstance(self.share_weights, bool):
            found.append(f"share_weights={self.share_weights!r} must be true or false")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            found.append(f"dropout={dropout!r} must be a number in [0, 1), e.g. 0.0 or 0.05")
        found += names_problem("modules_to_save", self.modules_to_save)
        return found

    def windows(self) -> tuple[int, int, list[str]]:
        """(first K, last K, the windows that get an intervention of their own)."""
        first, last = parse_positions(self.positions)
        if first and last:
            return first, last, ["shared"] if self.share_weights else ["first", "last"]
        return first, last, ["first"] if first else ["last"]


def _layers_problem(layers: Any) -> list[str]:
    if layers == "all":
        return []
    indices = isinstance(layers, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    if indices and layers and len(set(layers)) == len(layers):
        return []
    return [f"layers={layers!r} must be 'all' or a non-empty list of distinct block indices ≥ 0, e.g. [0, 4, 8]"]


# --- the intervention ------------------------------------------------------------------------------

class _DiagonalAsSigns(nn.Module):
    """Hands torch's Householder map the signs of its input's diagonal, ±1, instead of the values.

    That map reads the diagonal as the signs of the reflections with `.int()`, which truncates toward
    zero. The diagonal gets no gradient, but AdamW's weight decay still shrinks it (−1 → −0.9999 after one
    step at lr 1e-2 and torch's default decay 0.01), and the map would then zero R's rows. With the
    signs, decay cannot reach R.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        diagonal = torch.eye(X.shape[-2], X.shape[-1], dtype=torch.bool, device=X.device)
        return torch.where(diagonal, X.sign(), X)

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X  # the Householder map's own right inverse already puts ±1 on the diagonal


def keep_orthonormal(module: nn.Module, name: str) -> None:
    """Make module.<name>, an (r, d) matrix with r ≤ d, orthonormal-rowed for good, starting from its value.

    torch's orthogonal parametrisation with Householder reflectors and no trivialisation: it stores
    one (r, d) tensor (so the count stays r·d) and costs O(d·r²) a forward. matrix_exp and cayley
    build a d×d matrix each forward (O(d³)), and trivialisation keeps a d×d buffer per intervention.
    """
    start = getattr(module, name).detach().clone()
    parametrize.register_parametrization(module, name, _DiagonalAsSigns())
    orthogonal(module, name, orthogonal_map="householder", use_trivialization=False)
    with torch.no_grad():
        setattr(module, name, start)  # the reflectors of `start`, so the parametrised value starts there


class ReftIntervention(nn.Module):
    """One edit h -> h + Rᵀ(…) of the residual stream: R (r, d), W (r, d), b (r,).

    LoReFT keeps R's parametrisation in float64, whatever the model's dtype (r·d numbers, so the
    memory is nothing). A matrix with orthonormal rows has several sets of Householder reflectors
    (one per choice of signs), and training may move R onto a set other than the one the right
    inverse picks when loading. In float64 both sets give R to ~1e-16, so R rounded to float32 is
    the same bit for bit and a saved adapter loads exactly; the file holds R in float64 for that.
    """

    def __init__(self, d: int, r: int, kind: str, dropout: float, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.kind = kind
        r_dtype = torch.float64 if kind == "loreft" else dtype
        self.R = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d, dtype=r_dtype, device=device)))
        source = nn.Linear(d, r, dtype=dtype, device=device)  # nn.Linear's default initialisation
        self.W, self.b = source.weight, source.bias
        self.dropout = nn.Dropout(dropout)
        if kind == "loreft":
            keep_orthonormal(self, "R")

    def tensors(self) -> dict[str, torch.Tensor]:
        """R (the orthonormal matrix itself), W and b, under their names in the file."""
        return {"R": self.R, "W": self.W, "b": self.b}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if parametrize.is_parametrized(self, "R"):
            original = self.parametrizations.R.original
            self.R = tensors["R"].to(original)  # through the parametrisation's right inverse
        else:
            self.R.copy_(tensors["R"])
        self.W.copy_(tensors["W"])
        self.b.copy_(tensors["b"])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The edit Rᵀ(…) for h (..., d), in h's dtype; the caller adds it where the window is."""
        update = fn.loreft_update if self.kind == "loreft" else fn.direft_update
        dtype = self.W.dtype
        return self.dropout(update(h.to(dtype), self.R.to(dtype), self.W, self.b)).to(h.dtype)


class ReftAdapter(nn.Module):
    """One adapter on one block: an intervention per window, and the window sizes."""

    def __init__(self, config: ReftConfig, d: int, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.first, self.last, windows = config.windows()
        self.windows = nn.ModuleDict({w: ReftIntervention(d, config.r, config.kind, config.dropout,
                                                          dtype=dtype, device=device) for w in windows})

    def forward(self, h: torch.Tensor, real: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """h (B, T, d) edited at this adapter's prompt positions; real (B, T) bool, lengths (B,)."""
        first, last = fn.reft_windows(real, lengths, self.first, self.last)  # (B, T) each
        masks = {"first": first, "last": last, "shared": first | last}
        for window, intervention in self.windows.items():  # first, then last: they compose on overlaps
            h = torch.where(masks[window].unsqueeze(-1), h + intervention(h), h)
        return h


class ReftBlock(WrappedLayer):
    """A block (decoder or encoder layer) whose output hidden states carry named ReFT adapters."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.reft = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.reft.keys())

    def add_adapter(self, name: str, config: ReftConfig, d: int) -> None:
        like = next((p for p in self.base.parameters() if p.is_floating_point()), None)
        # float32 unless the base is float64: in a half-precision model the trained tensors keep full precision
        dtype = torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32
        adapter = ReftAdapter(config, d, dtype=dtype, device=like.device if like is not None else None)
        adapter.train(self.base.training)  # dropout follows the model's mode
        self.reft[name] = adapter

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.reft[name].parameters()) if name in self.reft else []

    def delete_adapter(self, name: str) -> None:
        del self.reft[name]
        self.active = [n for n in self.active if n != name]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{path}.reft.{window}.{key}": tensor
                for window, intervention in self.reft[name].windows.items()
                for key, tensor in intervention.tensors().items()}

    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        for window, intervention in self.reft[name].windows.items():
            intervention.load({key: tensors[f"{PREFIX}{path}.reft.{window}.{key}"] for key in TENSORS})

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)  # (B, T, d), or a tuple that starts with it
        mixed = self.context.adapter_names is not None
        names = [n for n in self.active if n in self.reft]
        if self.disabled or self.context.decoding or not (mixed or names):
            return out  # a cached decode step: the prompt, edited at the prefill, is in the cache
        h = out[0] if isinstance(out, tuple) else out
        real, lengths = self.prompt(h)
        if mixed:
            edited = h
            for name, rows in self.rows_by_adapter(h.shape[0]).items():
                if name in self.reft:
                    edited = edited.index_copy(0, rows, self.reft[name](h[rows], real[rows], lengths[rows]))
        else:
            outs = [self.reft[n](h, real, lengths) for n in names]
            edited = outs[0] if len(outs) == 1 else h + sum(o - h for o in outs)  # each reads h; edits add
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    def prompt(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real (B, T) bool, prompt lengths (B,)) for the block's hidden states h (B, T, d)."""
        B, T = h.shape[:2]
        mask = self.context.attention_mask
        real = torch.ones(B, T, dtype=torch.bool, device=h.device) if mask is None else mask.to(h.device).bool()
        if real.shape != (B, T):
            raise ConfigError(f"ReFT finds its positions in the attention mask, of shape {tuple(real.shape)}, but "
                              f"the block's hidden states are (B, T) = {(B, T)}; give a (B, T) mask of the "
                              f"model's own tokens (adapters that add virtual tokens do not combine with ReFT)",
                              source="attention_mask")
        lengths = self.context.prompt_lengths
        if lengths is None:
            return real, real.sum(-1)
        lengths = torch.as_tensor(lengths, device=h.device).reshape(-1)
        if lengths.shape != (B,):
            raise ConfigError(f"prompt_lengths has {lengths.numel()} entries but the batch has {B} rows; give "
                              f"one prompt length per row", source="prompt_lengths")
        return real, lengths


# --- attaching -----------------------------------------------------------------------------------------

def chosen_blocks(model: nn.Module, config: ReftConfig) -> list[str]:
    """The full names of the blocks `config.layers` picks, bottom to top.

    Raises:
        TargetError: the model has no repeated blocks.
        ConfigError: an index beyond the model's blocks.
    """
    blocks = block_names(model)
    if not blocks:
        raise TargetError(f"ReFT edits the residual stream between a model's repeated blocks, and this "
                          f"{type(model).__name__} has none (no nn.ModuleList of decoder or encoder layers)",
                          source="ReftConfig on this model")
    if config.layers == "all":
        return blocks
    bad = sorted(i for i in config.layers if i >= len(blocks))
    if bad:
        raise ConfigError(f"layers={list(config.layers)} names block(s) {bad}, but this model has {len(blocks)} "
                          f"blocks ({blocks[0]} … {blocks[-1]}); use indices 0–{len(blocks) - 1} or 'all'",
                          source="ReftConfig on this model")
    return [blocks[i] for i in sorted(config.layers)]


def residual_width(model: nn.Module) -> int:
    """d, the width of the residual stream: the model config's hidden_size, else the embeddings' width."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(d, int):
        return d
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embeddings, "embedding_dim", None), int):
        return embeddings.embedding_dim
    raise ConfigError(f"cannot tell the residual stream's width of this {type(model).__name__}: it has neither "
                      f"config.hidden_size nor get_input_embeddings()", source="ReftConfig on this model")


def attach_reft(model: nn.Module, config: ReftConfig, name: str, *, init: bool = True,
                plan: FilePlan | None = None) -> list[str]:
    """Wrap the chosen blocks of `model` (in place) and give each a ReFT adapter `name`.

    Args:
        init: unused; the interventions always start initialised, and loading overwrites them.
        plan: from a file: the blocks to edit.

    Returns:
        The full names of the edited blocks.

    Raises:
        TargetError: the model has no repeated blocks.
        ConfigError: `layers` beyond the model's blocks, or r above the model's width.
    """
    targets = plan.targets if plan is not None else chosen_blocks(model, config)
    d = residual_width(model)
    if config.r > d:
        raise ConfigError(f"r={config.r} is more than the residual stream's width d={d}: the edited subspace has "
                          f"at most d dimensions; use r ≤ {d}", source="ReftConfig on this model")
    for target in targets:
        block = site_at(model, target, ReftBlock)
        block.add_adapter(name, config, d)
    return targets


# --- the adapter file ------------------------------------------------------------------------------

USED_KEYS = {"kind", "r", "layers", "positions", "share_weights", "dropout", "modules_to_save"}


def config_to_file(model: nn.Module, config: ReftConfig, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """adapter_config.json: the config's fields, with `layers` as the block indices edited."""
    blocks = block_names(model)
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "kind": config.kind, "r": config.r, "layers": [blocks.index(path) for path in adapted],
        "positions": config.positions, "share_weights": config.share_weights, "dropout": config.dropout,
        "modules_to_save": list(config.modules_to_save) or None,
    }


def config_from_file(values: dict[str, Any], where: str) -> ReftConfig:
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "ReFT")
    known = {k: values[k] for k in USED_KEYS if values.get(k) is not None}
    known["modules_to_save"] = list(dict.fromkeys(values.get("modules_to_save") or []))
    return ReftConfig.from_dict(known, source=where)


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: ReftConfig,
                   where: str) -> FilePlan:
    """The file's blocks, which must be the ones its `layers` name on this model."""
    _, plan = file_layout.group_by_module(model, tensors, SUFFIXES, config.modules_to_save, where)
    file_layout.check_targets(plan.targets, chosen_blocks(model, config), where,
                              "the ReFT tensors are not on the blocks the config names:",
                              unexpected=f"in the file, but layers={config.layers} does not name this block",
                              absent=f"layers={config.layers} names this block, the file has no tensors for it")
    return plan
