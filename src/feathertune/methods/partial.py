"""Partial and full fine-tuning: train chosen tensors of the base model itself.

The baselines every PEFT method is judged against:
- freeze the lower layers, train the top ones (`top_blocks`) — the classic transfer-learning recipe
  (Yosinski et al. 2014, "How transferable are features in deep neural networks?"), or named
  modules (`modules`);
- BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models"): only the bias terms (`bias_only`);
- full fine-tuning (`modules: all`, the training config's `method: full`).

On the chosen set S of tensors:

    θ'_S = θ_S + Δ_S   (every entry of Δ_S trained),   θ' = θ elsewhere

Each chosen tensor gets a trainable copy per adapter, beside the frozen original that the base
keeps: so `disabled()` is the base, several fine-tunes share one base and run in one mixed batch,
and merging is a copy (exact). Several active fine-tunes add their changes, θ + Σᵢ(θᵢ − θ), as the
outputs of several active adapters add up everywhere in feathertune. Tensors tied in the base
(Llama's lm_head and input embeddings) share one trainable copy, so they stay tied.

BitFit on a model whose linear layers have no bias (Llama, Qwen): `bias_only` adds a zero bias to
each chosen linear or convolution but the output head, and trains that, so the start is exactly
the base. `top_blocks`
also trains what sits above the blocks (the final norm, the head), except a tensor tied to one
below them: a head tied to the input embeddings stays frozen, since training it would change the
embeddings too. Tensors inside another method's wrapper are that method's, and are left alone.

File (feathertune's own, peft_type "PARTIAL"): `base_model.model.<module path>.<tensor name>` for
each chosen tensor, e.g. `…model.layers.29.mlp.down_proj.weight`; only these tensors, so loading puts
them onto a fresh base.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from feathertune import file_layout
from feathertune.config import MethodConfig, modules_problem, names_problem, positive_int
from feathertune.errors import ConfigError, TargetError
from feathertune.file_layout import PREFIX, FilePlan
from feathertune.saved_modules import ModulesToSave
from feathertune.targeting import block_names, hf_conv1d_class, name_matches, output_head_name
from feathertune.wrapping import WrappedLayer, inside_wrapper, site_at

PEFT_TYPE = "PARTIAL"
ALL = "all"  # modules: every module of the model (full fine-tuning)


@dataclasses.dataclass
class PartialConfig(MethodConfig):
    """Which tensors of the base train. The options add up: top_blocks ∪ modules, then bias_only."""

    method: ClassVar[str] = "partial"

    top_blocks: int | None = None  # train the top N blocks and what sits above them (final norm, head)
    # "all" (full fine-tuning), a list (exact name or dotted suffix) or a regex on the full name: every
    # tensor in and below the modules it names.
    modules: str | list[str] | None = None
    bias_only: bool = False  # BitFit: of the chosen modules (all, if none are chosen), only the biases
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # a new task head, saved whole

    def problems(self) -> list[str]:
        found = []
        if self.top_blocks is not None:
            found += positive_int("top_blocks", self.top_blocks, "2 to 4, or null")
        if self.modules is not None and self.modules != ALL:
            found += modules_problem("modules", self.modules, none_means="none")
        if not isinstance(self.bias_only, bool):
            found.append(f"bias_only={self.bias_only!r} must be true or false")
        if self.top_blocks is None and self.modules is None and self.bias_only is False:
            found.append("PartialConfig chooses nothing to train: set top_blocks (e.g. 2), modules (names, a regex "
                         "or 'all') or bias_only=true (BitFit)")
        found += names_problem("modules_to_save", self.modules_to_save)
        return found


class PartialLayer(WrappedLayer):
    """A module whose own tensors (weight, bias, …) have a trainable copy per adapter.

    The forward runs the frozen module with the active adapter's tensors in place of its own
    (torch.func.functional_call), so the module itself is never changed until `merge`.
    """

    needs_attention_mask = False  # the wrapped module gets its arguments, mask included, as they come

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.tuned = nn.ModuleDict()  # adapter -> ParameterDict(tensor name -> trainable copy)
        self.tied: dict[str, set[str]] = {}  # adapter -> tensors whose copy an earlier module holds (and saves)
        self._originals: dict[str, nn.Parameter | None] | None = None  # while merged: the base's own tensors

    def adapter_names(self) -> list[str]:
        return list(self.tuned.keys())

    def add_adapter(self, name: str, tensor_names: list[str], copies: dict[int, nn.Parameter]) -> None:
        """Give adapter `name` a copy of each tensor; `copies` (original's id -> copy) keeps tied tensors tied."""
        tuned, self.tied[name] = nn.ParameterDict(), set()
        for tensor_name in tensor_names:
            original = getattr(self.base, tensor_name, None)
            if original is None:  # BitFit on a layer without a bias: a new one, zero
                weight = self.base.weight
                dtype = weight.dtype if weight.is_floating_point() else torch.float32
                tuned[tensor_name] = nn.Parameter(torch.zeros(output_width(self.base), dtype=dtype,
                                                              device=weight.device))
                continue
            if id(original) in copies:
                self.tied[name].add(tensor_name)
            else:
                copies[id(original)] = nn.Parameter(original.detach().clone())
            tuned[tensor_name] = copies[id(original)]
        self.tuned[name] = tuned

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.tuned[name].values()) if name in self.tuned else []

    def delete_adapter(self, name: str) -> None:
        del self.tuned[name]
        self.tied.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        # A tied tensor is written once, by the first module that holds it; loading ties it again.
        return {f"{PREFIX}{path}.{key}": value for key, value in self.tuned[name].items()
                if key not in self.tied[name]}

    @torch.no_grad()
    def load_file_tensors(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, param in self.tuned[name].items():
            if key not in self.tied[name]:
                param.copy_(tensors[f"{PREFIX}{path}.{key}"])

    def effective(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors the forward uses with adapters `names` active: θ + Σᵢ(θᵢ − θ), θᵢ itself for one."""
        holding = [self.tuned[n] for n in names if n in self.tuned]
        if len(holding) == 1:
            return dict(holding[0])
        values: dict[str, torch.Tensor] = {}
        for tuned in holding:
            for key, value in tuned.items():
                original = getattr(self.base, key, None)
                start = values.get(key, torch.zeros_like(value) if original is None else original)
                values[key] = start + (value - (0 if original is None else original))
        return values

    def forward(self, *args, **kwargs):
        if self.disabled or self.is_merged():
            return self.base(*args, **kwargs)
        if self.context.adapter_names is not None:
            return self._mixed_batch(*args, **kwargs)
        values = self.effective(self.active)
        return functional_call(self.base, values, args, kwargs) if values else self.base(*args, **kwargs)

    def _mixed_batch(self, x: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
        """Each row through its own adapter's tensors. An input shared by every row (GPT-2's position
        ids, batch 1) gives an output per row."""
        batch = len(self.context.adapter_names)
        shared = x.shape[0] == 1 and batch > 1
        out = self.base(x, *rest, **kwargs)
        out = out.expand(batch, *out.shape[1:]) if shared else out
        for name, rows in self.rows_by_adapter(batch).items():
            if name in self.tuned:
                rows_out = functional_call(self.base, dict(self.tuned[name]), (x if shared else x[rows], *rest), kwargs)
                out = out.index_copy(0, rows, rows_out.expand(len(rows), *out.shape[1:]).to(out.dtype))
        return out

    def is_merged(self) -> bool:
        return self._originals is not None

    def merges_into(self) -> set[str]:
        return set()  # merge puts new tensors in, writing none of the base's: tied tensors stay as they are

    @torch.no_grad()
    def merge(self) -> None:
        """Put the fine-tuned tensors into the base layer, keeping its own (restored by `unmerge`)."""
        if self.is_merged():
            return
        values = self.effective(self.active)
        self._originals = {key: getattr(self.base, key, None) for key in values}
        for key, value in values.items():
            # A view of the adapter's copy, not a copy: no memory, and tied tensors stay one tensor.
            self.base.register_parameter(key, nn.Parameter(value.detach(), requires_grad=False))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.is_merged():
            return
        for key, original in self._originals.items():
            self.base.register_parameter(key, original)  # the very tensor it was: ties come back too
        self._originals = None


def output_width(module: nn.Module) -> int:
    """The size of the bias a linear or convolution would have."""
    conv1d = hf_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[1]  # HF Conv1D stores (in, out)
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels  # nn.Conv1d / Conv2d / Conv3d


def _can_have_bias(module: nn.Module) -> bool:
    conv1d = hf_conv1d_class()
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        conv1d is not None and isinstance(module, conv1d))


# --- choosing the tensors ---------------------------------------------------------------------------

def chosen_tensors(model: nn.Module, config: PartialConfig) -> dict[str, list[str]]:
    """Module path -> names of its own tensors to train (a bias BitFit adds included), in model order.

    Raises:
        TargetError: nothing chosen, top_blocks larger than the model, or modules matching nothing.
        ConfigError: a chosen tensor is quantized (4-bit tensors cannot train).
    """
    in_scope = _scope(model, config)
    skip, head = inside_wrapper(model), output_head_name(model)
    saved = list(config.modules_to_save) + [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    chosen: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or name in skip or _under(name, saved) or not in_scope(name):
            continue
        if isinstance(module, WrappedLayer) and not isinstance(module, PartialLayer):
            continue  # another method's wrapper: its tensors are that method's
        own = module.base if isinstance(module, PartialLayer) else module
        names = [k for k, v in own._parameters.items() if v is not None]
        if config.bias_only:  # a new bias on the output head would not survive transformers' reload
            names = ["bias"] if "bias" in names or (_can_have_bias(own) and name != head) else []
        if names:
            chosen[name] = names
    if config.top_blocks is not None:
        chosen = _untie_from_below(model, chosen, in_scope)
    chosen = with_tied(model, chosen)
    _refuse_quantized(model, chosen)
    if not chosen:
        raise TargetError(f"{config} chose no tensor of this model to train; the model's top-level modules are "
                          f"{', '.join(n for n, _ in model.named_children())}")
    return chosen


def _scope(model: nn.Module, config: PartialConfig):
    """A test on module names: inside what top_blocks and modules choose (everything if neither does)."""
    tests = []
    if config.modules == ALL or (config.modules is None and config.top_blocks is None):
        return lambda name: True
    if config.modules is not None:
        rule = config.modules
        if not any(name_matches(n, rule) for n, _ in model.named_modules() if n):
            raise TargetError(f"PartialConfig(modules={rule!r}) matched no module; top-level modules are "
                              f"{', '.join(n for n, _ in model.named_children())}")
        tests.append(lambda name: any(name_matches(p, rule) for p in _prefixes(name)))
    if config.top_blocks is not None:
        blocks = block_names(model)
        if config.top_blocks > len(blocks):
            raise TargetError(f"PartialConfig(top_blocks={config.top_blocks}) asks for more blocks than the model "
                              f"has ({len(blocks)}{': ' + blocks[0] + ' … ' + blocks[-1] if blocks else ''}); "
                              f"give at most {len(blocks)}, or name modules")
        top = blocks[len(blocks) - config.top_blocks:]
        order = [n for n, _ in model.named_modules()]
        after = order.index(blocks[-1])  # modules registered after the blocks: final norm, head
        above = {n for n in order[after + 1:] if not any(n == b or n.startswith(b + ".") for b in blocks)}
        tests.append(lambda name: name in above or any(name == b or name.startswith(b + ".") for b in top))
    return lambda name: any(test(name) for test in tests)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _under(name: str, modules: list[str]) -> bool:
    return any(name_matches(p, modules) for p in _prefixes(name))


def _untie_from_below(model: nn.Module, chosen: dict[str, list[str]], in_scope) -> dict[str, list[str]]:
    """Drop chosen tensors that are tied to a tensor outside the scope (a head tied to the embeddings)."""
    outside = {id(p) for n, m in model.named_modules() if n and not in_scope(n)
               for p in m._parameters.values() if p is not None}
    kept = {path: [t for t in names if id(getattr(model.get_submodule(path), t, None)) not in outside]
            for path, names in chosen.items()}
    return {path: names for path, names in kept.items() if names}


def with_tied(model: nn.Module, chosen: dict[str, list[str]]) -> dict[str, list[str]]:
    """`chosen` with every other module that holds one of its tensors (tied tensors are one tensor)."""
    wanted = {id(getattr(model.get_submodule(path), t)) for path, names in chosen.items() for t in names
              if getattr(model.get_submodule(path), t, None) is not None}
    skip = inside_wrapper(model)
    out = {path: list(names) for path, names in chosen.items()}
    for name, module in model.named_modules():
        other_method = isinstance(module, WrappedLayer) and not isinstance(module, PartialLayer)
        if not name or name in skip or other_method:
            continue
        own = module.base if isinstance(module, PartialLayer) else module
        for key, param in own._parameters.items():
            if param is not None and id(param) in wanted and key not in out.get(name, []):
                out.setdefault(name, []).append(key)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _refuse_quantized(model: nn.Module, chosen: dict[str, list[str]]) -> None:
    frozen = [f"{path}.{t}" for path, names in chosen.items() for t in names
              if (v := getattr(model.get_submodule(path), t, None)) is not None and not v.is_floating_point()]
    if frozen:
        raise ConfigError(f"partial fine-tuning trains the base's own tensors, and {len(frozen)} chosen ones are "
                          f"quantized ({', '.join(frozen[:4])}{' …' if len(frozen) > 4 else ''}); drop quantize, "
                          f"or choose modules that are not quantized (bias_only, norms, the head)",
                          source="PartialConfig")


def attach_partial(model: nn.Module, config: PartialConfig, name: str, *, init: bool = True,
                   plan: FilePlan | None = None) -> list[str]:
    """Give adapter `name` a trainable copy of each chosen tensor (wrapping their modules in place).

    Args:
        init: unused: the copies start as the base's values, which a file then overwrites.
        plan: from a file: the modules and, in `plan.sizes`, each one's tensor names.

    Returns:
        The full names of the modules whose tensors train.
    """
    chosen = {t: plan.sizes[t] for t in plan.targets} if plan is not None else chosen_tensors(model, config)
    copies: dict[int, nn.Parameter] = {}  # shared by every module, so tied tensors share one copy
    for path, tensor_names in chosen.items():
        module = site_at(model, path, PartialLayer)
        module.add_adapter(name, tensor_names, copies)
    return list(chosen)


# --- the adapter file ---------------------------------------------------------------------------

USED_KEYS = {"top_blocks", "modules", "bias_only", "modules_to_save"}


def config_to_file(model: nn.Module, config: PartialConfig, name: str, adapted: list[str],
                   saved: list[str]) -> dict[str, Any]:
    return {**file_layout.common_header(model, PEFT_TYPE, saved), "top_blocks": config.top_blocks,
            "modules": config.modules, "bias_only": config.bias_only,
            "modules_to_save": list(config.modules_to_save) or None}


def config_from_file(values: dict[str, Any], where: str) -> PartialConfig:
    file_layout.refuse_unknown(values, USED_KEYS, {}, where, "partial fine-tuning")
    return PartialConfig.from_dict({
        "top_blocks": values.get("top_blocks"), "modules": values.get("modules"),
        "bias_only": values.get("bias_only", False),
        "modules_to_save": list(dict.fromkeys(values.get("modules_to_save") or [])),
    }, source=where)


def plan_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], config: PartialConfig,
                   where: str) -> FilePlan:
    """Which modules the file's tensors belong to, with each one's tensor names (`plan.sizes`)."""
    modules = dict(model.named_modules())
    plan, by_path, unplaced = FilePlan(), {}, []
    for key in tensors:
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        owner = None if rest is None else file_layout.saved_owner(rest, modules, config.modules_to_save)
        if owner is not None:
            plan.saved += [owner] if owner not in plan.saved else []
            continue
        path, _, tensor = (rest or "").rpartition(".")
        module = modules.get(path)
        if isinstance(module, PartialLayer):
            module = module.base
        if module is None or not (tensor in module._parameters or (tensor == "bias" and _can_have_bias(module))):
            unplaced.append(key if rest is not None else f"{key} (does not start with {PREFIX!r})")
            continue
        by_path.setdefault(path, []).append(tensor)
    if unplaced:
        raise file_layout.mismatch(f"{where}: tensors that do not fit this model:", unplaced)
    by_path = with_tied(model, by_path)
    plan.targets, plan.sizes = list(by_path), by_path
    order = {n: i for i, n in enumerate(modules)}
    plan.saved.sort(key=order.__getitem__)
    return plan
