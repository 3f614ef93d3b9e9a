"""Bottleneck adapters.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (§2.1, fig. 2), and Pfeiffer
et al. 2020, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (§3):

    h ← h + W_up·f(W_down·h + b_down) + b_up,   W_down ∈ ℝ^{m×d},  W_up ∈ ℝ^{d×m},  m ≪ d

on a sublayer's output h, before the residual add: after the attention and after the FFN
("houlsby"), or after the FFN only ("pfeiffer", which the paper finds as good at half the cost).
W_up and b_up start at zero, so the model starts exactly at the base; 2·d·m + d + m numbers train
per adapter. Here the adapter wraps the sublayer's output projection (Llama's o_proj / down_proj,
GPT-2's attn.c_proj / mlp.c_proj, BERT's attention.output.dense / output.dense), whose output is h.

The nonlinearity sits between the two projections, so the adapter cannot fold into the weights:
it stays attached for inference. feathertune's own format (PEFT has no bottleneck adapters):
`base_model.model.<path>.adapter_down.weight` (m, d), `.adapter_down.bias` (m,),
`.adapter_up.weight` (d, m), `.adapter_up.bias` (d,), with peft_type "BOTTLENECK".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.config import MethodConfig, modules_problem, names_problem, positive_int
from feathertune.errors import ConfigError, TargetError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.saved_modules import ModulesToSave
from feathertune.targeting import find_targets, hf_conv1d_class
from feathertune.wrapping import WrappedLayer, site_at

PEFT_TYPE = "BOTTLENECK"
STYLES = ("houlsby", "pfeiffer")
SUPPORTED = "nn.Linear, transformers Conv1D"
TENSORS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

# model_type -> (after the attention, after the FFN): regexes on the full name. Exact rules, since in
# BERT the suffix "output.dense" names both the attention's and the FFN's output projection.
_LLAMA_LIKE = (r"(.*\.)?self_attn\.o_proj", r"(.*\.)?mlp\.down_proj")
_BERT_LIKE = (r"(.*\.)?attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense")
DEFAULT_SITES: dict[str, tuple[str, str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gpt2": (r"(.*\.)?attn\.c_proj", r"(.*\.)?mlp\.c_proj"),
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
}


@dataclasses.dataclass
class BottleneckConfig(MethodConfig):
    """Where bottleneck adapters go and how wide they are. Defaults follow Pfeiffer et al. 2020."""

    method: ClassVar[str] = "bottleneck"

    style: str = "houlsby"  # "houlsby": after attention and FFN; "pfeiffer": after the FFN only
    reduction_factor: int = 16  # m = d // reduction_factor (at least 1); Pfeiffer et al. use 16
    bottleneck_size: int | None = None  # m itself, overriding reduction_factor
    non_linearity: str = "relu"  # f: relu, gelu, tanh or silu
    # None: the output projections the style names, for this architecture. list: exact name or
    # dotted suffix; str: a regex on the full name. Each target's output is the h above.
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # trained in full, saved too

    def problems(self) -> list[str]:
        found = []
        if self.style not in STYLES:
            found.append(f"style={self.style!r} is not one of {', '.join(STYLES)}")
        found += positive_int("reduction_factor", self.reduction_factor, "16, 32")
        if self.bottleneck_size is not None:
            found += positive_int("bottleneck_size", self.bottleneck_size, "16 to 256, or None")
        if not isinstance(self.non_linearity, str) or self.non_linearity not in fn.BOTTLENECK_ACTIVATIONS:
            found.append(f"non_linearity={self.non_linearity!r} is not one of "
                         f"{', '.join(fn.BOTTLENECK_ACTIVATIONS)}")
        found += modules_problem("target_modules", self.target_modules,
                                 none_means="the style's sublayer outputs for this architecture")
        found += names_problem("modules_to_save", self.modules_to_save)
        return found

    def width(self, d: int) -> int:
        """The bottleneck m for a layer of width d."""
        return self.bottleneck_size if self.bottleneck_size is not None else max(1, d // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """One adapter's two projections: down (d -> m) and up (m -> d), up zero-initialised."""

    def __init__(self, d: int, m: int, non_linearity: str, *, dtype=None, device=None):
        super().__init__()
        self.adapter_down = nn.Linear(d, m, dtype=dtype, device=device)
        self.adapter_up = nn.Linear(m, d, dtype=dtype, device=device)
        self.non_linearity = non_linearity

    @torch.no_grad()
    def initialise(self) -> None:
        # Down as nn.Linear's Kaiming-uniform (so f sees unit-order inputs), up zero: an identity at start.
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to h. (..., d) -> (..., d), in h's dtype."""
        down, up = self.adapter_down, self.adapter_up
        update = fn.bottleneck_update(h.to(down.weight.dtype), down.weight, down.bias, up.weight, up.bias,
                                      self.non_linearity)
        return update.to(h.dtype)


class BottleneckLayer(WrappedLayer):
    """Named bottleneck adapters on the output of one layer (nn.Linear or HF Conv1D).

    Several active adapters each read the same h and their updates add up, as the outputs of
    several active adapters do everywhere in feathertune.
    """

    needs_attention_mask = False  # a function of each position's input alone

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.bottleneck = nn.ModuleDict()

    def width(self) -> int:
        """d, the base layer's output width."""
        conv1d = hf_conv1d_class()
        if conv1d is not None and isinstance(self.base, conv1d):
            return self.base.weight.shape[1]  # Conv1D stores (in, out)
        return self.base.out_features

    def adapter_names(self) -> list[str]:
        return list(self.bottleneck.keys())

    def add_adapter(self, name: str, m: int, non_linearity: str, init: bool = True) -> None:
        weight = self.base.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # 4-bit bases: float32
        adapter = BottleneckAdapter(self.width(), m, non_linearity, dtype=dtype, device=weight.device)
        if init:
            adapter.initialise()
        adapter.train(self.base.training)  # new modules start in train mode; follow the model's
        self.bottleneck[name] = adapter

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.bottleneck[name].parameters()) if name in self.bottleneck else []

    def delete_adapter(self, name: str) -> None:
        del self.bottleneck[name]
        self.active = [n for n in self.active if n != name]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{path}.{key}": tensor for key, tensor in self.bottleneck[name].named_parameters()}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, param in self.bottleneck[name].named_parameters():
            param.copy_(tensors[f"{PREFIX}{path}.{key}"])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base(x, *args, **kwargs)  # (..., d)
        if self.disabled:
            return h
        if self.context.adapter_names is not None:
            out = h
            for name, rows in self.rows_by_adapter(h.shape[0]).items():
                if name in self.bottleneck:
                    out = out.index_add(0, rows, self.bottleneck[name](h[rows]))
            return out
        out = h
        for name in self.active:
            if name in self.bottleneck:
                out = out + self.bottleneck[name](h)
        return out


def _supported(module: nn.Module) -> bool:
    conv1d = hf_conv1d_class()
    return isinstance(module, (BottleneckLayer, nn.Linear)) or (conv1d is not None and isinstance(module, conv1d))


# --- attaching ---------------------------------------------------------------------------------

def target_rule(model: nn.Module, config: BottleneckConfig) -> str | list[str]:
    """config.target_modules, or the style's sublayer outputs for this architecture (a regex).

    Raises:
        ConfigError: target_modules is None and the architecture has no defaults.
    """
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_SITES:
        raise ConfigError(f"BottleneckConfig(target_modules=None) means the sublayer outputs of a known "
                          f"architecture, and model_type={model_type!r} is not one (known: "
                          f"{', '.join(sorted(DEFAULT_SITES))}); give target_modules: the output projections "
                          f"of the attention and the FFN, e.g. ['o_proj', 'down_proj']",
                          source="BottleneckConfig on this model")
    attention, ffn = DEFAULT_SITES[model_type]
    return f"(?:{attention})|(?:{ffn})" if config.style == "houlsby" else ffn


def attach_bottleneck(model: nn.Module, config: BottleneckConfig, name: str, *, init: bool = True,
                      plan: FilePlan | None = None) -> list[str]:
    """Wrap the targeted layers of `model` (in place) and give each a bottleneck adapter `name`.

    Args:
        init: False skips initialisation (the tensors are filled from a file).
        plan: from a file: the modules to adapt and each one's m (`plan.sizes`).

    Returns:
        The full names of the adapted modules.

    Raises:
        ConfigError: no defaults for this architecture.
        TargetError: target_modules matched nothing usable.
    """
    if plan is not None:
        targets, sizes = plan.targets, plan.sizes
        bad = [f"{t} ({type(model.get_submodule(t)).__name__})" for t in targets if not _supported(model.get_submodule(t))]
        if bad:
            raise TargetError(f"the file puts bottleneck adapters on {', '.join(bad)}; supported: {SUPPORTED}")
    else:
        saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
        targets, sizes = find_targets(model, target_rule(model, config), layers=None,
                                      exclude=list(config.modules_to_save) + saved, supported=_supported,
                                      supported_names=SUPPORTED), {}
    for target in targets:
        module = site_at(model, target, BottleneckLayer)
        module.add_adapter(name, sizes.get(target, config.width(module.width())), config.non_linearity, init=init)
    return targets


# --- the adapter file ---------------------------------------------------------------------------

USED_KEYS = {"style", "reduction_factor", "bottleneck_size", "non_linearity", "target_modules", "modules_to_save"}


def config_to_file(model: nn.Module, config: BottleneckConfig, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """adapter_config.json: the config's fields, with the targets as exact paths and m as found."""
    targets = [m for m in adapted if isinstance(model.get_submodule(m), BottleneckLayer)]
    widths = {model.get_submodule(m).bottleneck[name].adapter_down.out_features for m in targets}
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "style": config.style,
        "reduction_factor": config.reduction_factor,
        "bottleneck_size": widths.pop() if len(widths) == 1 else config.bottleneck_size,
        "non_linearity": config.non_linearity,
        "target_modules": targets,
        "modules_to_save": list(config.modules_to_save) or None,
    }


def config_from_file(values: dict[str, Any], where: str) -> BottleneckConfig:
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "bottleneck")
    return BottleneckConfig.from_dict({
        "style": values.get("style", "houlsby"),
        "reduction_factor": values.get("reduction_factor", 16),
        "bottleneck_size": values.get("bottleneck_size"),
        "non_linearity": values.get("non_linearity", "relu"),
        "target_modules": values.get("target_modules"),
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
    }, source=where)


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: BottleneckConfig,
                   where: str) -> FilePlan:
    """Which modules the file adapts, with each one's m (`plan.sizes`) read from adapter_down."""
    by_path, plan = file_layout.group_by_module(model, tensors, TENSORS, config.modules_to_save, where)
    missing = [f"{PREFIX}{path}.adapter_down.weight (the file has {', '.join(sorted(parts))} for this module)"
               for path, parts in by_path.items() if "adapter_down.weight" not in parts]
    if missing:
        raise file_layout.mismatch(f"{where}: tensors that do not fit this model:", missing)
    plan.sizes = {path: parts["adapter_down.weight"].shape[0] for path, parts in by_path.items()}
    return plan
