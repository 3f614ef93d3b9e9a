"""Prompt tuning.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning": n learned input
embeddings P ∈ ℝ^{n×d} go in front of every sequence's token embeddings,

    h⁰ = [P; E[x]]    (B, n+T, d),   n·d parameters, the model frozen

so the model reads a soft prompt it cannot see in the vocabulary. The virtual tokens carry no loss
(labels −100), are always attended (mask 1) and have token type 0. After the forward their n
positions are dropped from per-token outputs (causal-LM logits, hidden states), so the outputs line
up with the caller's input_ids; a classifier's logits are unchanged. The shared bookkeeping
(mask, positions, KV cache, PEFT's file layout) is in `prompt.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from feathertune import file_layout
from feathertune import functional as fn
from feathertune.config import MethodConfig, names_problem, positive_int
from feathertune.errors import ConfigError
from feathertune.file_layout import FilePlan
from feathertune.methods import prompt
from feathertune.wrapping import unwrap

PEFT_TYPE = "PROMPT_TUNING"
INITS = ("random", "vocab", "text")
PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
IGNORE_INDEX = -100  # labels that carry no loss


@dataclasses.dataclass
class PromptTuningConfig(MethodConfig):
    """How many virtual tokens, and how they start."""

    method: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 20  # n; the paper finds 20 already close to 100 at scale (fig. 3)
    # "random": U(−0.5, 0.5) as in the paper; "vocab": embeddings of sampled vocabulary tokens;
    # "text": the embeddings of init_text's tokens, repeated or cut to n (the paper's best is class labels).
    init: str = "random"
    init_text: str | None = None  # init="text" only
    tokenizer: str | None = None  # init="text": a local tokenizer directory (default: the model's own)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # e.g. ["classifier"]

    def problems(self) -> list[str]:
        found = positive_int("num_virtual_tokens", self.num_virtual_tokens, "20-100")
        if self.init not in INITS:
            found.append(f"init={self.init!r} is not one of {', '.join(INITS)}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            found.append(f"init='text' needs init_text, the text whose tokens start the prompt "
                         f"(got {self.init_text!r})")
        for field in ("init_text", "tokenizer"):
            value = getattr(self, field)
            if value is not None and self.init != "text":
                found.append(f"{field}={value!r} is only used with init='text' (init={self.init!r})")
            elif field == "tokenizer" and value is not None and not isinstance(value, str):
                found.append(f"{field}={value!r} must be a string")
        found += names_problem("modules_to_save", self.modules_to_save)
        return found


class PromptEmbedding(nn.Module):
    """One adapter's prompt: n learned vectors in the model's embedding space."""

    def __init__(self, n: int, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, width, dtype=dtype, device=device))  # P (n, d)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]


class PromptTuningSite(prompt.VirtualTokenSite):
    """Prepends the active adapter's prompt to the input embeddings; drops it from the outputs."""

    attribute = "feathertune_prompt_tuning"

    def __init__(self, causal_lm: bool):
        super().__init__()
        self.causal_lm = causal_lm  # the model's loss shifts labels by one (next-token prediction)
        self._real_length: int | None = None  # this forward's T, while its outputs still hold the prompt
        self._as_tuple = False  # the caller asked for return_dict=False

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {prompt.EMBEDDINGS_KEY: self.adapters[name].weight}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        self.adapters[name].weight.copy_(tensors[prompt.EMBEDDINGS_KEY])

    def prepare_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        self._real_length, self._as_tuple = None, False
        name = self.running(model)
        if name is None:
            return kwargs
        kwargs, P = dict(kwargs), self.adapters[name].weight
        n, past = P.shape[0], self.context.past_length
        if self.context.decoding:  # the cache holds the prompt already
            return prompt.shift_for_virtual_tokens(kwargs, n, in_inputs=False, cache_start=past)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            prompt.batch_size(kwargs, "prompt tuning")  # a clear error if there is no input at all
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        T = embeds.shape[1]
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, fn.prepend_prompt(P, embeds)  # (B, n+T, d)
        self.pad_token_inputs(kwargs, n, T)
        if kwargs.get("return_dict") is False:  # outputs are realigned by name, then turned back
            kwargs["return_dict"], self._as_tuple = True, True
        self._real_length = T
        return prompt.shift_for_virtual_tokens(kwargs, n, in_inputs=True, cache_start=past)

    def pad_token_inputs(self, kwargs: dict[str, Any], n: int, T: int) -> None:
        """Labels −100 and token types 0 for the virtual tokens; logits_to_keep indices shifted."""
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == T \
                and not labels.is_floating_point():  # per-token labels (not a classifier's)
            if self.causal_lm:
                # No position of the caller's sequence predicts its first token, so the prompt's
                # last position must not either: the loss equals the one from the stripped logits.
                labels = labels.clone()
                labels[:, 0] = IGNORE_INDEX
            kwargs["labels"] = fn.prepend_constant(labels, n, IGNORE_INDEX)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = fn.prepend_constant(kwargs["token_type_ids"], n, 0)
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):  # positions in the caller's sequence
            kwargs["logits_to_keep"] = keep + n

    def finish_outputs(self, output: Any) -> Any:
        T, self._real_length = self._real_length, None
        if T is None or not hasattr(output, "keys"):
            return output
        for key in ("logits", "last_hidden_state"):
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 3:  # per-token (a classifier's is 2-D)
                output[key] = _real_positions(value, T)
        if isinstance(output.get("hidden_states"), tuple):
            output["hidden_states"] = tuple(_real_positions(h, T) for h in output["hidden_states"])
        return output.to_tuple() if self._as_tuple else output


def _real_positions(x: torch.Tensor, T: int) -> torch.Tensor:
    """The last T positions of (B, n+T, ...): the caller's tokens. Shorter (logits_to_keep) stays."""
    return x[:, -T:] if x.shape[1] > T else x


# --- attaching ------------------------------------------------------------------------------------

def attach_prompt_tuning(model: nn.Module, config: PromptTuningConfig, name: str, *, init: bool = True,
                         plan: FilePlan | None = None) -> list[str]:
    """Add adapter `name`'s prompt to the model's prompt-tuning site (created on first use).

    Args:
        init: False leaves the prompt at zero, to be filled from a file.

    Returns:
        The site's path in the model.

    Raises:
        ConfigError: the model has no input embeddings, or init='text' finds no tokenizer.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(unwrap(embeddings), "weight", None)  # under a LoRA or modules_to_save wrapper too
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"{type(model).__name__} has no input embedding layer (get_input_embeddings()); prompt "
                          f"tuning prepends learned embeddings to it, so it needs a transformers model",
                          source="PromptTuningConfig on this model")
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    adapter = PromptEmbedding(config.num_virtual_tokens, weight.shape[1], dtype, weight.device)
    if init:
        with torch.no_grad():
            adapter.weight.copy_(initial_prompt(model, embeddings, config))
    causal = file_layout.peft_task_type(model, []) == "CAUSAL_LM"
    site = prompt.site_of(model, PromptTuningSite, causal)
    site.adapters[name] = adapter
    prompt.use_prompt_file_keys(model, name)
    return [site.attribute]


def initial_prompt(model: nn.Module, embeddings: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """The starting prompt (n, d) for config.init."""
    n, weight = config.num_virtual_tokens, unwrap(embeddings).weight
    if config.init == "random":  # the paper's §3.2: uniform in [−0.5, 0.5]
        return torch.rand(n, weight.shape[1], device=weight.device) - 0.5
    if config.init == "vocab":
        ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
    else:
        ids = torch.tensor(text_token_ids(model, config), device=weight.device)
    return embeddings(ids).detach()


def text_token_ids(model: nn.Module, config: PromptTuningConfig) -> list[int]:
    """init_text's token ids (no special tokens), repeated or cut to num_virtual_tokens."""
    path = config.tokenizer or file_layout.base_model_name(model)
    if not path:
        raise ConfigError("init='text' needs a tokenizer, and this model has no local directory "
                          "(model.config.name_or_path is empty); pass PromptTuningConfig(tokenizer='path/to/dir')",
                          source="PromptTuningConfig")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"init='text': no tokenizer could be loaded offline from {path!r} ({exc}); pass "
                          f"PromptTuningConfig(tokenizer='path/to/dir') with a local tokenizer directory",
                          source="PromptTuningConfig") from None
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text={config.init_text!r} has no tokens", source="PromptTuningConfig")
    n = config.num_virtual_tokens
    return (ids * (n // len(ids) + 1))[:n]


# --- PEFT's adapter_config.json -------------------------------------------------------------------

USED_KEYS = prompt.SHARED_KEYS | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                  "tokenizer_kwargs"}


def config_to_file(model: nn.Module, config: PromptTuningConfig, name: str, sites: list[str],
                   saved: list[str]) -> dict[str, Any]:
    """PEFT's PromptTuningConfig for adapter `name`, with the model's sizes filled in as PEFT does."""
    dims = prompt.model_dims(model)
    site = model.get_submodule(PromptTuningSite.attribute)
    tokenizer = config.tokenizer or file_layout.base_model_name(model)
    # PEFT refuses TEXT without a tokenizer; the init does not change a saved prompt, so say RANDOM.
    init = "RANDOM" if config.init == "text" and not tokenizer else PEFT_INITS[config.init]
    return {
        **file_layout.common_header(model, PEFT_TYPE, saved),
        "task_type": prompt.task_type(model, saved),
        "auto_mapping": None,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": site.adapters[name].weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": dims["heads"],
        "num_layers": dims["layers"],
        "modules_to_save": list(config.modules_to_save) or None,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }


def config_from_file(values: dict[str, Any], where: str) -> PromptTuningConfig:
    """The PromptTuningConfig a PEFT adapter_config.json describes, after refusing what we lack."""
    inits = {v: k for k, v in PEFT_INITS.items()}
    peft_init = values.get("prompt_tuning_init", "RANDOM")
    found = prompt.check_shared_keys(values)
    if peft_init not in inits:
        found.append(f"prompt_tuning_init={peft_init!r} (feathertune knows {', '.join(inits)})")
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "prompt tuning", extra=found)
    text = inits[peft_init] == "text"
    return PromptTuningConfig.from_dict({
        "num_virtual_tokens": values.get("num_virtual_tokens"),
        "init": inits[peft_init],
        "init_text": values.get("prompt_tuning_init_text") if text else None,
        "tokenizer": values.get("tokenizer_name_or_path") if text else None,
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
    }, source=where)


plan_from_file = prompt.plan_from_file
