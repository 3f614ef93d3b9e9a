"""LLaMA-Adapter: learnable adaption prompts behind a zero-initialised gate.

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention". In each of the top `adapter_layers` attention layers, `adapter_len` learned prompts P
(L × hidden) are attended by the layer's own queries, through a gate g that starts at zero:

    out = attn(x) + o_proj(g · softmax(q·k_Pᵀ/√d_h) · v_P),   k_P = k_proj(P),  v_P = v_proj(P)

q is the layer's rotary query; the prompt keys get no rotary and no mask, and the softmax over the
prompts is separate from the one over the tokens (eq. 8), so g = 0 gives exactly the base model.
Only P and g train: adapter_layers · (adapter_len · hidden + 1) numbers.

The maths and the file layout are PEFT's ADAPTION_PROMPT (keys `<attention path>.adaption_prompt`
(1, L, hidden) and `.adaption_gate` (1,)). The prompts never enter the KV cache: each new query
attends to them afresh, which costs 2·L·d per head and token. The math is in `functional`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.config import MethodConfig, positive_int
from feathertune.errors import ConfigError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.wrapping import WrappedLayer, site_at, unwrap

PEFT_TYPE = "ADAPTION_PROMPT"
# model.config.model_type values whose attention is Llama's: q/k/v/o projections, rotary
# position_embeddings passed in, head_dim on the module. PEFT itself knows llama and mistral.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUFFIXES = {"prompt": "adaption_prompt", "gate": "adaption_gate"}  # PEFT's names after "<path>."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_CHILD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass
class LlamaAdapterConfig(MethodConfig):
    """How many prompts, in how many layers. Defaults are the paper's for LLaMA-7B (32 layers).

    adapter_layers larger than the model's layer count is refused (as PEFT does) rather than
    clipped, so that the parameter count is always the one asked for.
    """

    method: ClassVar[str] = "llama_adapter"

    adapter_len: int = 10  # prompts per layer; the paper's K = 10
    adapter_layers: int = 30  # the top layers that get prompts; the paper's L = 30 of 32
    target_modules: str = "self_attn"  # the attention module's child name in each decoder layer

    def problems(self) -> list[str]:
        found = []
        for field, typical in (("adapter_len", "10"), ("adapter_layers", "30, or the model's layer count")):
            found += positive_int(field, getattr(self, field), typical)
        if not isinstance(self.target_modules, str) or not _CHILD_NAME.fullmatch(self.target_modules):
            found.append(f"target_modules={self.target_modules!r} must be the attention module's name inside "
                         f"each decoder layer, one identifier such as 'self_attn'")
        return found


class AdaptionPrompt(nn.Module):
    """One adapter's prompts and gate on one attention layer, in PEFT's shapes."""

    def __init__(self, length: int, hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(1, length, hidden, dtype=dtype, device=device))  # (1, L, D)
        self.gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))  # (1,): zero-init

    def initialise(self) -> None:
        # Standard normal as the official repo's nn.Embedding (and PEFT); the zero gate hides them.
        with torch.no_grad():
            self.prompt.normal_()
            self.gate.zero_()


class AdaptedAttention(WrappedLayer):
    """A Llama-style attention layer with named adaption prompts; the layer itself is called as is."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.adaption = nn.ModuleDict()

    @property
    def attention(self) -> nn.Module:
        """The attention module itself, under any other method's wrapper: its projections and head_dim."""
        return unwrap(self.base)

    # --- adapters ----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.adaption.keys())

    def add_adapter(self, name: str, length: int, init: bool = True) -> None:
        weight = unwrap(self.attention.q_proj).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # 4-bit bases: fp32, as PEFT
        prompt = AdaptionPrompt(length, self.attention.config.hidden_size, dtype, weight.device)
        if init:
            prompt.initialise()
        self.adaption[name] = prompt

    def delete_adapter(self, name: str) -> None:
        del self.adaption[name]
        self.active = [n for n in self.active if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adaption[name].parameters()) if name in self.adaption else []

    # --- files -------------------------------------------------------------------------------
    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        prompt = self.adaption[name]
        return {f"{PREFIX}{path}.{suffix}": getattr(prompt, field) for field, suffix in SUFFIXES.items()}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        prompt = self.adaption[name]
        for field, suffix in SUFFIXES.items():
            getattr(prompt, field).copy_(tensors[f"{PREFIX}{path}.{suffix}"])

    # --- forward -----------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> tuple:
        out = self.base(*args, **kwargs)  # (attn_output (B, T, D), attn_weights)
        mixed = self.context.adapter_names is not None
        names = [n for n in self.active if n in self.adaption]
        if self.disabled or not (mixed or names):
            return out
        hidden, (cos, sin) = self.inputs(args, kwargs)
        B, T, _ = hidden.shape
        attention = self.attention
        q = attention.q_proj(hidden).view(B, T, -1, attention.head_dim).transpose(1, 2)  # (B, H, T, d)
        q = fn.rotary_query(q, cos, sin)
        attn_out = out[0]
        if mixed:  # each row its own adapter, or none
            for name, rows in self.rows_by_adapter(B).items():
                if name in self.adaption:
                    delta = self.prompt_output(self.adaption[name], q[rows])
                    attn_out = attn_out.index_add(0, rows, delta.to(attn_out.dtype))
        else:
            for name in names:
                attn_out = attn_out + self.prompt_output(self.adaption[name], q).to(attn_out.dtype)
        return (attn_out, *out[1:])

    def prompt_output(self, prompt: AdaptionPrompt, q: torch.Tensor) -> torch.Tensor:
        """o_proj(g · softmax(q·k_Pᵀ/√d_h) · v_P) for a rotary query q (B, H, T, d). -> (B, T, D)"""
        attention = self.attention
        k_prompt = attention.k_proj(prompt.prompt)  # (1, L, H_kv·d)
        v_prompt = attention.v_proj(prompt.prompt)  # (1, L, H_kv·d)
        return attention.o_proj(fn.adaption_prompt_attention(q, k_prompt, v_prompt, prompt.gate))

    def inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple]:
        """(hidden_states, (cos, sin)) from the call, by name or by position as transformers passes them."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rotary is None:
            raise TypeError(f"{type(self.attention).__name__} was called without position_embeddings; "
                            f"LLaMA-Adapter needs the rotary (cos, sin) that transformers' decoder layers pass in")
        return hidden, rotary


# --- targeting ------------------------------------------------------------------------------------

def check_architecture(model: nn.Module) -> None:
    """Refuse models whose attention is not Llama's, naming the model and what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        given = f"model_type={model_type!r}" if model_type else "no config.model_type"
        raise ConfigError(f"LLaMA-Adapter needs Llama-style attention (q/k/v/o projections with rotary "
                          f"queries); this {type(model).__name__} has {given}. Supported model types: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}", source="LlamaAdapterConfig on this model")


def attention_targets(model: nn.Module, config: LlamaAdapterConfig) -> list[str]:
    """The top `adapter_layers` modules named `target_modules`, in model order, as PEFT picks them."""
    check_architecture(model)
    where = "LlamaAdapterConfig on this model"
    found = [n for n, _ in model.named_modules() if n.endswith("." + config.target_modules)]
    if not found:
        children = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "q_proj")})
        raise ConfigError(f"target_modules={config.target_modules!r} matched no module; the attention modules "
                          f"of this model are named {', '.join(map(repr, children)) or 'nothing known'}",
                          source=where)
    if config.adapter_layers > len(found):
        raise ConfigError(f"adapter_layers={config.adapter_layers} but this model has {len(found)} "
                          f"{config.target_modules!r} layers; set adapter_layers to at most {len(found)}",
                          source=where)
    targets = found[-config.adapter_layers:]
    problems = [p for t in targets for p in _attention_problems(t, unwrap(model.get_submodule(t)))]
    if problems:
        raise ConfigError(problems, source=where)
    return targets


def _attention_problems(path: str, attention: nn.Module) -> list[str]:
    missing = [p for p in (*PROJECTIONS, "head_dim", "config") if not hasattr(attention, p)]
    if missing:
        return [f"{path} ({type(attention).__name__}) is not a Llama-style attention module: it lacks "
                f"{', '.join(missing)}"]
    if getattr(unwrap(attention.o_proj), "bias", None) is not None:
        # PEFT's o_proj(g·…) would add o_proj's bias a second time, so gate 0 would not be the base.
        return [f"{path}.o_proj has a bias (attention_bias=True?): PEFT's LLaMA-Adapter adds it twice, so "
                f"the zero gate no longer gives the base model; feathertune does not support such models"]
    return []


def attach_llama_adapter(model: nn.Module, config: LlamaAdapterConfig, name: str, *, init: bool = True,
                         plan: FilePlan | None = None) -> list[str]:
    """Wrap the top `adapter_layers` attention layers (in place) and add adapter `name` to each.

    Args:
        init: False leaves prompts and gates at zero, to be filled from a file.
        plan: from a file (`plan_from_file`): the attention layers to adapt.

    Returns:
        The full names of the wrapped attention modules.

    Raises:
        ConfigError: a model that is not Llama-style, or more adapter_layers than it has.
    """
    targets = plan.targets if plan is not None else attention_targets(model, config)
    for target in targets:
        module = site_at(model, target, AdaptedAttention)
        module.add_adapter(name, config.adapter_len, init=init)
    return targets


# --- PEFT's adapter_config.json -------------------------------------------------------------------

USED_KEYS = {"target_modules", "adapter_len", "adapter_layers"}


def config_to_file(model: nn.Module, config: LlamaAdapterConfig, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """PEFT's AdaptionPromptConfig keys for adapter `name`."""
    return {**file_layout.common_header(model, PEFT_TYPE, saved), "target_modules": config.target_modules,
            "adapter_len": config.adapter_len, "adapter_layers": len(adapted)}


def config_from_file(values: dict[str, Any], where: str) -> LlamaAdapterConfig:
    """The config a PEFT ADAPTION_PROMPT adapter_config.json describes; unknown keys are refused."""
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "LLaMA-Adapter")
    return LlamaAdapterConfig.from_dict({
        "adapter_len": values.get("adapter_len"),
        "adapter_layers": values.get("adapter_layers"),
        "target_modules": values.get("target_modules") or "self_attn",
    }, source=where)


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: LlamaAdapterConfig,
                   where: str) -> FilePlan:
    """The file's attention layers, which must be the top `adapter_layers` ones (where PEFT puts them)."""
    _, plan = file_layout.group_by_module(model, tensors, tuple(SUFFIXES.values()), [], where)
    expected = attention_targets(model, config)
    file_layout.check_targets(plan.targets, expected, where,
                              "the adaption prompts are not on the layers the config names:",
                              unexpected=f"in the file, but not among the top {len(expected)} attention layers",
                              absent=f"adapter_layers={config.adapter_layers} puts prompts here, the file has none")
    return plan
