"""Prefix tuning.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation": at every attention
layer l, n learned keys and values go in front of the tokens' own,

    head_l = softmax(q·[P_kˡ; K]ᵀ / √d_h) · [P_vˡ; V]     P_kˡ, P_vˡ ∈ ℝ^{n×d_kv}

so each token attends to n virtual tokens it cannot see in the input: 2·L·n·d_kv parameters
(d_kv = H_kv·d_h, the width of one layer's keys; d under multi-head attention). The prefixes sit in
the KV cache (a transformers DynamicCache) before the real tokens. Training P directly is
unstable (§4.3), so it can be trained as P = MLP(P') (`prefix_projection`, PEFT's PrefixEncoder:
Embedding → Linear → tanh → Linear) and folded into plain prefixes when saved, as PEFT does; a
loaded adapter is plain. The shared bookkeeping (mask, positions, PEFT's layout) is in `prompt.py`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.config import MethodConfig, names_problem, positive_int
from feathertune.errors import ConfigError, UnsupportedAdapterError
from feathertune.file_layout import FilePlan
from feathertune.methods import prompt
from feathertune.wrapping import CACHE_ARGUMENTS, unwrap

PEFT_TYPE = "PREFIX_TUNING"
SUPPORTED = ("decoder-only transformers models whose forward takes a KV cache (`cache`), e.g. "
             "LlamaForCausalLM, GPT2LMHeadModel, MistralForCausalLM, Qwen2ForCausalLM")


@dataclasses.dataclass
class PrefixTuningConfig(MethodConfig):
    """How many virtual tokens, and whether they train through the reparameterisation MLP."""

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20  # n; the paper uses 10 (table-to-text) to 200 (summarisation)
    prefix_projection: bool = False  # train P = MLP(P') (§4.3, more stable); folded into P when saved
    encoder_hidden_size: int | None = None  # the MLP's hidden width (default: d_kv, PEFT's token_dim)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # e.g. ["score"]

    def problems(self) -> list[str]:
        found = positive_int("num_virtual_tokens", self.num_virtual_tokens, "10-200")
        if not isinstance(self.prefix_projection, bool):
            found.append(f"prefix_projection={self.prefix_projection!r} must be true or false")
        if self.encoder_hidden_size is not None:
            found += positive_int("encoder_hidden_size", self.encoder_hidden_size, "d_kv, or None")
            if self.prefix_projection is False:
                found.append(f"encoder_hidden_size={self.encoder_hidden_size} is only used with prefix_projection=true")
        found += names_problem("modules_to_save", self.modules_to_save)
        return found


@dataclasses.dataclass(frozen=True)
class KvGeometry:
    """The shape of a model's KV cache: L layers of H key/value heads of width d_h."""

    layers: int
    heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:  # d_kv: one layer's key (or value) for one token
        return self.heads * self.head_dim

    @property
    def width(self) -> int:  # one virtual token's row in the file: L·2·d_kv
        return 2 * self.layers * self.token_dim


class PrefixAdapter(nn.Module):
    """One adapter's prefixes: P (n, L·2·d_kv) itself, or P' (n, d_kv) and the MLP that maps it to P."""

    def __init__(self, n: int, geometry: KvGeometry, hidden: int | None, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.prefix = nn.Parameter(torch.zeros(n, geometry.width, **kw)) if hidden is None else None
        self.embedding = nn.Parameter(torch.zeros(n, geometry.token_dim, **kw)) if hidden else None
        self.hidden_layer = nn.Linear(geometry.token_dim, hidden, **kw) if hidden else None
        self.output_layer = nn.Linear(hidden, geometry.width, **kw) if hidden else None

    @property
    def num_virtual_tokens(self) -> int:
        return (self.prefix if self.prefix is not None else self.embedding).shape[0]

    @property
    def projected(self) -> bool:
        return self.prefix is None

    def initialise(self) -> None:
        """N(0, 1) as PEFT's nn.Embedding; the MLP's linears keep nn.Linear's own init."""
        with torch.no_grad():
            nn.init.normal_(self.embedding if self.projected else self.prefix)

    def flat_prefix(self) -> torch.Tensor:
        """P (n, L·2·d_kv), in PEFT's layout (see functional.prefix_key_values)."""
        if not self.projected:
            return self.prefix
        first, last = self.hidden_layer, self.output_layer
        return fn.prefix_mlp(self.embedding, first.weight, first.bias, last.weight, last.bias)


class PrefixTuningSite(prompt.VirtualTokenSite):
    """Puts the active adapter's prefixes in the KV cache at prefill; decode steps find them there."""

    attribute = "feathertune_prefix_tuning"

    def __init__(self, geometry: KvGeometry):
        super().__init__()
        self.geometry = geometry

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        adapter = self.adapters[name]
        if not adapter.projected:
            return {prompt.EMBEDDINGS_KEY: adapter.prefix}
        with torch.no_grad():  # folded, as PEFT saves it
            return {prompt.EMBEDDINGS_KEY: adapter.flat_prefix()}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        adapter = self.adapters[name]
        if adapter.projected:
            raise UnsupportedAdapterError(
                f"adapter {name!r} trains its prefixes through the reparameterisation MLP (prefix_projection="
                f"true), and a file holds only the folded prefixes, from which the MLP cannot be rebuilt; "
                f"ft.load_adapter loads the file as plain prefixes (a training run resumes from its "
                f"checkpoint, which keeps the MLP)")
        adapter.prefix.copy_(tensors[prompt.EMBEDDINGS_KEY])

    def prepare_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        name = self.running(model)
        if name is None:
            return kwargs
        kwargs, adapter = dict(kwargs), self.adapters[name]
        n, start = adapter.num_virtual_tokens, self.context.past_length
        if not self.context.decoding:  # prefill or a forward without a cache: the prefixes go in
            key = cache_key(model, kwargs)
            batch = prompt.batch_size(kwargs, "prefix tuning")
            kwargs[key] = self.cache_with_prefix(model, kwargs.get(key), adapter, batch)
            start += n
        return prompt.shift_for_virtual_tokens(kwargs, n, in_inputs=False, cache_start=start)

    def cache_with_prefix(self, model: nn.Module, cache: Any, adapter: PrefixAdapter, batch: int) -> Any:
        """The (empty) cache given, or a new DynamicCache, holding every layer's prefix for each row."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        g = self.geometry
        prefix = adapter.flat_prefix().to(compute_dtype(model, adapter))
        for layer, (keys, values) in enumerate(fn.prefix_key_values(prefix, g.layers, g.heads, g.head_dim)):
            # (H, n, d_h) -> (B, H, n, d_h); the cache's concatenation makes the copy (and keeps the grad)
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache


def cache_key(model: nn.Module, kwargs: dict[str, Any]) -> str:
    """The name under which this forward takes its KV cache (a None alias is dropped)."""
    given = next((k for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
    if given is not None:
        return given
    for key in CACHE_ARGUMENTS:
        kwargs.pop(key, None)
    parameters = inspect.signature(model.forward).parameters
    return next(k for k in CACHE_ARGUMENTS if k in parameters)


def compute_dtype(model: nn.Module, adapter: PrefixAdapter) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(unwrap(embeddings), "weight", None) if embeddings is not None else None
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next(adapter.parameters()).dtype


# --- which models take a prefix -------------------------------------------------------------------

def kv_geometry(model: nn.Module) -> KvGeometry:
    """L, H_kv and d_h as PEFT reads them (grouped-query attention: the key/value heads).

    Raises:
        ConfigError: the model cannot take a KV prefix; the message names it and what is supported.
    """
    refuse_unsupported(model)
    dims = prompt.model_dims(model)
    text = model.config.get_text_config(decoder=True)
    kv_heads = getattr(text, "num_key_value_heads", None) or dims["heads"]
    head_dim = getattr(text, "head_dim", None) or dims["width"] // dims["heads"]
    return KvGeometry(layers=dims["layers"], heads=kv_heads, head_dim=head_dim)


def refuse_unsupported(model: nn.Module) -> None:
    """Raise a ConfigError naming the architecture if its attention cannot read a KV prefix."""
    config = getattr(model, "config", None)
    reasons = []
    if config is None:
        reasons.append("it is not a transformers model (no config)")
    elif getattr(config, "is_encoder_decoder", False):
        reasons.append("it is an encoder-decoder model (feathertune's prefix tuning is for decoders)")
    parameters = inspect.signature(model.forward).parameters
    if not any(k in parameters for k in CACHE_ARGUMENTS):
        reasons.append("its forward takes no KV cache (`cache` / `past_key_values`)")
    if any(getattr(m, "is_causal", None) is False and hasattr(m, "layer_idx") for m in model.modules()):
        reasons.append("its self-attention is bidirectional (an encoder: its attention mask ignores the cache)")
    if reasons:
        kind = getattr(config, "model_type", None)
        raise ConfigError(f"prefix tuning puts learned keys and values in the KV cache, and {type(model).__name__}"
                          f"{f' (model_type {kind!r})' if kind else ''} cannot take them: {'; '.join(reasons)}. "
                          f"Supported: {SUPPORTED}. For an encoder such as BERT use prompt tuning "
                          f"(PromptTuningConfig), which prepends embeddings instead",
                          source="PrefixTuningConfig on this model")


# --- attaching ------------------------------------------------------------------------------------

def attach_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, name: str, *, init: bool = True,
                         plan: FilePlan | None = None) -> list[str]:
    """Add adapter `name`'s prefixes to the model's prefix-tuning site (created on first use).

    Args:
        init: False leaves the prefixes at zero, to be filled from a file.

    Returns:
        The site's path in the model.

    Raises:
        ConfigError: the model cannot take a KV prefix (e.g. BERT).
    """
    geometry = kv_geometry(model)
    weight = next(p for p in model.parameters() if p.is_floating_point())
    hidden = (config.encoder_hidden_size or geometry.token_dim) if config.prefix_projection else None
    adapter = PrefixAdapter(config.num_virtual_tokens, geometry, hidden, weight.dtype, weight.device)
    if init:
        adapter.initialise()
    site = prompt.site_of(model, PrefixTuningSite, geometry)
    site.adapters[name] = adapter
    prompt.use_prompt_file_keys(model, name)
    return [site.attribute]


# --- PEFT's adapter_config.json -------------------------------------------------------------------

USED_KEYS = prompt.SHARED_KEYS | {"encoder_hidden_size", "prefix_projection", "init_weights"}


def config_to_file(model: nn.Module, config: PrefixTuningConfig, name: str, sites: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """PEFT's PrefixTuningConfig for adapter `name`, as PEFT writes it.

    prefix_projection says how the prefixes were trained; the file holds them folded either way,
    and PEFT (inference mode) and feathertune both load it as plain prefixes.
    """
    g = model.get_submodule(PrefixTuningSite.attribute).geometry
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "task_type": prompt.task_type(model, saved),
        "auto_mapping": None,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": g.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": g.heads,
        "num_layers": g.layers,
        "modules_to_save": list(config.modules_to_save) or None,
        "encoder_hidden_size": config.encoder_hidden_size or g.token_dim,
        "prefix_projection": config.prefix_projection,
        "init_weights": None,
    }


def config_from_file(values: dict[str, Any], where: str) -> PrefixTuningConfig:
    """The PrefixTuningConfig of a PEFT file: plain prefixes, whatever trained them."""
    found = prompt.check_shared_keys(values)
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "prefix tuning", extra=found)
    return PrefixTuningConfig.from_dict({
        "num_virtual_tokens": values.get("num_virtual_tokens"),
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
    }, source=where)


plan_from_file = prompt.plan_from_file
