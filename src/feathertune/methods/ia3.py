"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (§3.3). Learned vectors rescale the keys, the values and the FFN's inner activation:

    k = l_k ⊙ (W_k·x + b_k),   v = l_v ⊙ (W_v·x + b_v),   FFN(x) = W_down·(l_ff ⊙ γ(W_up·x))

so a target layer either scales its output ("output scaling", l ∈ ℝ^out) or, for the FFN's down
projection (the `feedforward_modules`), its input (l ∈ ℝ^in). Every l starts at ones, so the model
starts exactly at the base, and only Σ widths numbers train. Both fold into the weight:
diag(l_out)·W, b ← l_out ⊙ b, or W·diag(l_in). Several active adapters multiply.

Files are PEFT's: `base_model.model.<path>.ia3_l`, shaped (out, 1) for output and (1, in) for input
scaling, on nn.Linear and HF Conv1D alike. The math is in `functional`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune import quant
from feathertune.config import MethodConfig, modules_problem, names_problem, type_problem
from feathertune.errors import ConfigError, TargetError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.saved_modules import ModulesToSave
from feathertune.targeting import find_targets, hf_conv1d_class
from feathertune.wrapping import WrappedLayer, site_at

PEFT_TYPE = "IA3"
SUFFIX = "ia3_l"
SUPPORTED = "nn.Linear, transformers Conv1D"

# model_type -> (target_modules, feedforward_modules): PEFT's defaults
# (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_), so None means the same in both.
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """Which layers get (IA)³ vectors, and which of them scale their input rather than their output."""

    method: ClassVar[str] = "ia3"

    # list: exact name or dotted suffix; str: regex on the full name (or "all-linear");
    # None: PEFT's defaults for the architecture (keys, values and the FFN's down projection).
    target_modules: str | list[str] | None = None
    # The targets whose *input* is scaled (the FFN's down projection in the paper). As in PEFT, a
    # list entry matches a name that ends with it, a str is a regex; None: the architecture's
    # defaults (none when target_modules is given for an architecture without defaults).
    feedforward_modules: str | list[str] | None = None
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # trained in full, saved too
    init_ia3_weights: bool = True  # ones, so the model starts at the base; False: N(0, 1) as PEFT

    def problems(self) -> list[str]:
        found = modules_problem("target_modules", self.target_modules, none_means="the architecture's defaults")
        found += modules_problem("feedforward_modules", self.feedforward_modules,
                                 none_means="the architecture's defaults", allow_empty=True)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                found.append(f"feedforward_modules={self.feedforward_modules!r} must be a subset of target_modules="
                             f"{self.target_modules!r}; {extra} are not targets (add them to target_modules)")
        found += names_problem("modules_to_save", self.modules_to_save)
        found += type_problem("init_ia3_weights", self.init_ia3_weights, (bool,), "true or false")
        return found


class IA3Layer(WrappedLayer):
    """Named (IA)³ vectors around one nn.Linear or HF Conv1D (weight stored (in, out))."""

    needs_attention_mask = False  # a function of each position's input alone

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.ia3_l = nn.ParameterDict()  # name -> (out, 1) or (1, in), PEFT's layout
        self.feedforward: dict[str, bool] = {}  # name -> scales the input (else the output)
        conv1d = hf_conv1d_class()
        self.fan_in_fan_out = conv1d is not None and isinstance(base, conv1d)
        self._merged: dict[str, Any] | None = None  # the original weight and bias, while merged

    def features(self) -> tuple[int, int]:
        """(in, out) of the base layer."""
        if self.fan_in_fan_out:
            return tuple(self.base.weight.shape)  # Conv1D stores (in, out)
        return self.base.in_features, self.base.out_features

    # --- adapters ----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add_adapter(self, name: str, feedforward: bool, random: bool = False) -> None:
        in_features, out_features = self.features()
        shape = (1, in_features) if feedforward else (out_features, 1)
        weight = self.base.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # 4-bit bases: float32
        vector = torch.randn(shape, dtype=dtype, device=weight.device) if random else \
            torch.ones(shape, dtype=dtype, device=weight.device)
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]] if name in self.ia3_l else []

    def delete_adapter(self, name: str) -> None:
        del self.ia3_l[name]
        del self.feedforward[name]
        self.active = [n for n in self.active if n != name]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{path}.{SUFFIX}": self.ia3_l[name]}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        self.ia3_l[name].copy_(tensors[f"{PREFIX}{path}.{SUFFIX}"])

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self._merged is not None:
            return self.base(x, *args, **kwargs)
        if self.context.adapter_names is None:
            scale_in, scale_out = self.combined([n for n in self.active if n in self.ia3_l])
        else:
            scale_in, scale_out = self.per_row(x)
        if scale_in is not None:
            x = fn.ia3_scale(x, scale_in)
        out = self.base(x, *args, **kwargs)
        return out if scale_out is None else fn.ia3_scale(out, scale_out)

    def combined(self, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input scaling, output scaling) of these adapters together, flat; None where none applies."""
        ins = [self.ia3_l[n] for n in names if self.feedforward[n]]
        outs = [self.ia3_l[n] for n in names if not self.feedforward[n]]
        return (fn.ia3_combined(ins) if ins else None), (fn.ia3_combined(outs) if outs else None)

    def per_row(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mixed batch: (B, 1, …, 1, d) scalings, each row its adapter's vector, base rows ones."""
        batch, scales = x.shape[0], {True: None, False: None}
        for name, rows in self.rows_by_adapter(batch).items():
            if name not in self.ia3_l:
                continue
            vector, kind = self.ia3_l[name].flatten(), self.feedforward[name]
            if scales[kind] is None:
                scales[kind] = torch.ones(batch, vector.numel(), dtype=vector.dtype, device=vector.device)
            scales[kind] = scales[kind].index_copy(0, rows, vector.expand(len(rows), -1))  # (B, d)
        middle = [1] * (x.dim() - 2)  # broadcast over the sequence (and any other middle) dims
        return tuple(None if scales[k] is None else scales[k].reshape(batch, *middle, -1) for k in (True, False))

    # --- merging -----------------------------------------------------------------------------
    def is_merged(self) -> bool:
        return self._merged is not None

    def weight_view(self) -> torch.Tensor:
        """The base weight as (out, in), a view of the parameter."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W ← diag(l_out)·W·diag(l_in), b ← l_out ⊙ b over the active adapters (idempotent).

        The original weight and bias are kept, so that `unmerge` restores them bit for bit (dividing
        by l would be inexact in low precision and impossible where l is 0).
        """
        names = [n for n in self.active if n in self.ia3_l]
        if self._merged is not None or not names:
            return
        if quant.is_quantized(self.base):
            raise ConfigError("(IA)³ cannot merge into a 4-bit (NF4) base; dequantize first "
                              "(ft.quant.dequantize_model) or keep the adapter attached", source="merge")
        weight, bias = self.base.weight, getattr(self.base, "bias", None)
        self._merged = {"weight": weight.detach().clone(), "bias": None if bias is None else bias.detach().clone()}
        scale_in, scale_out = self.combined(names)
        work = torch.promote_types(weight.dtype, torch.float32)
        new = fn.ia3_merged_weight(self.weight_view().to(work), _to(scale_in, work), _to(scale_out, work))
        weight.data.copy_((new.T if self.fan_in_fan_out else new).to(weight.dtype))
        if bias is not None:
            bias.data.copy_(fn.ia3_merged_bias(bias.to(work), _to(scale_out, work)).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        self.base.weight.data.copy_(self._merged["weight"])
        if self._merged["bias"] is not None:
            self.base.bias.data.copy_(self._merged["bias"])
        self._merged = None


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _supported(module: nn.Module) -> bool:
    conv1d = hf_conv1d_class()
    return isinstance(module, (IA3Layer, nn.Linear)) or (conv1d is not None and isinstance(module, conv1d))


# --- attaching ---------------------------------------------------------------------------------

def default_modules(model: nn.Module, config: IA3Config) -> tuple[str | list[str], str | list[str]]:
    """(target_modules, feedforward_modules) with None replaced by the architecture's defaults.

    Raises:
        ConfigError: target_modules is None and the architecture has no defaults.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = DEFAULT_MODULES.get(model_type)
    if defaults is None and config.target_modules is None:
        raise ConfigError(f"IA3Config(target_modules=None) means the architecture's defaults, and model_type="
                          f"{model_type!r} has none (defaults exist for {', '.join(sorted(DEFAULT_MODULES))}); "
                          f"give target_modules (and feedforward_modules, the FFN down projections whose input "
                          f"is scaled), e.g. IA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], "
                          f"feedforward_modules=['down_proj'])", source="IA3Config on this model")
    targets = config.target_modules if config.target_modules is not None else defaults[0]
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = list(defaults[1]) if defaults is not None else []
    return targets, feedforward


def is_feedforward(path: str, feedforward: str | list[str]) -> bool:
    """PEFT's rule for feedforward_modules: a regex must match the full name; a list entry need
    only end the name (plain `endswith`, not at a dot as for target_modules)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(entry) for entry in feedforward)


def _unused_feedforward(config: IA3Config, targets: list[str], feedforward: str | list[str]) -> list[str]:
    """Explicit feedforward_modules entries that pick out none of the targets: a typo, surely."""
    if config.feedforward_modules is None:
        return []
    rules = [feedforward] if isinstance(feedforward, str) else [[entry] for entry in feedforward]
    return [f"feedforward_modules entry {rule if isinstance(rule, str) else rule[0]!r} matches none of the "
            f"{len(targets)} targeted modules (e.g. {', '.join(targets[:3])}); feedforward modules must be "
            f"among target_modules" for rule in rules if not any(is_feedforward(t, rule) for t in targets)]


def attach_ia3(model: nn.Module, config: IA3Config, name: str, *, init: bool = True,
               plan: FilePlan | None = None) -> list[str]:
    """Wrap the targeted layers of `model` (in place) and give each an (IA)³ vector for `name`.

    Args:
        init: False leaves the vectors at ones, to be filled from a file.
        plan: from a file: the modules to adapt, instead of resolving `config.target_modules`.

    Returns:
        The full names of the adapted modules.

    Raises:
        ConfigError: no defaults for this architecture, or a feedforward entry that matches no target.
        TargetError: target_modules matched nothing usable.
    """
    target_rule, feedforward = default_modules(model, config)
    if plan is not None:
        targets = plan.targets
        bad = [f"{t} ({type(model.get_submodule(t)).__name__})" for t in targets if not _supported(model.get_submodule(t))]
        if bad:
            raise TargetError(f"the file puts (IA)³ vectors on {', '.join(bad)}; supported: {SUPPORTED}")
    else:
        saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
        targets = find_targets(model, target_rule, layers=None, exclude=list(config.modules_to_save) + saved,
                               supported=_supported, supported_names=SUPPORTED)
        problems = _unused_feedforward(config, targets, feedforward)
        if problems:
            raise ConfigError(problems, source="IA3Config on this model")
    for target in targets:
        module = site_at(model, target, IA3Layer)
        module.add_adapter(name, is_feedforward(target, feedforward), random=init and not config.init_ia3_weights)
    return targets


# --- PEFT's file format ------------------------------------------------------------------------

USED_KEYS = {"target_modules", "feedforward_modules", "modules_to_save", "init_ia3_weights",
             "fan_in_fan_out"}  # fan_in_fan_out: PEFT sets it from the layer type, as we do
MUST_BE_DEFAULT = {"exclude_modules": None}


def config_to_file(model: nn.Module, config: IA3Config, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """PEFT's adapter_config.json for adapter `name`, with the targets resolved to this model."""
    layers = {m: model.get_submodule(m) for m in adapted if isinstance(model.get_submodule(m), IA3Layer)}
    feedforward = [m for m, layer in layers.items() if layer.feedforward[name]]
    targets, feedforward_rule = file_targets(model, list(layers), feedforward, saved)
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "target_modules": targets,
        "feedforward_modules": feedforward_rule,
        "exclude_modules": None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": list(config.modules_to_save) or None,
        "init_ia3_weights": config.init_ia3_weights,
    }


def file_targets(model: nn.Module, adapted: list[str], feedforward: list[str],
                 saved: list[str]) -> tuple[list[str], list[str] | str]:
    """(target_modules, feedforward_modules) that PEFT's rules map to exactly these modules.

    Leaf names when they are exact, else full names; PEFT wants the feedforward list to be a subset
    of the target list, and reads it with plain `endswith`.
    """
    targets = file_layout.resolved_targets(model, adapted, saved)

    def exact(rule: list[str]) -> bool:
        return {m for m in adapted if is_feedforward(m, rule)} == set(feedforward)

    if targets != list(adapted):
        leaves = sorted({m.rsplit(".", 1)[-1] for m in feedforward})
        if set(leaves) <= set(targets) and exact(leaves):
            return targets, leaves
    if exact(list(feedforward)):
        return list(adapted), list(feedforward)
    return list(adapted), "|".join(re.escape(m) for m in feedforward)  # one name ends another


def config_from_file(values: dict[str, Any], where: str) -> IA3Config:
    """The IA3Config a PEFT adapter_config.json describes, after refusing what we lack."""
    file_layout.refuse_unknown(values, USED_KEYS, MUST_BE_DEFAULT, where, "(IA)³")
    return IA3Config.from_dict({
        "target_modules": values.get("target_modules"),
        "feedforward_modules": values.get("feedforward_modules"),
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
        "init_ia3_weights": values.get("init_ia3_weights", True),
    }, source=where)


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: IA3Config, where: str) -> FilePlan:
    """Which modules the file adapts; every key must find its place (shapes are checked on load)."""
    return file_layout.group_by_module(model, tensors, (SUFFIX,), config.modules_to_save, where)[1]
