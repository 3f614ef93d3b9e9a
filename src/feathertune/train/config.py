"""The training configuration: one YAML file, overridable as `dotted.key=value`, checked all at once.

    model: smollm2-135m-instruct
    method: lora                  # any registry name (feathertune.registry): lora, ia3, prompt_tuning, …
    adapter: {r: 16, alpha: 32, target_modules: all-linear}   # built by the method's own config class
    data: {train: data/e2e/train.jsonl, validation: data/e2e/validation.jsonl, max_length: 256}
    train: {max_steps: 200, batch_size: 8, lr: 1.0e-3}
    output: runs/e2e-lora

The CLI, the Python API and the service all build a `TrainConfig` and call `feathertune.run`, so
every key is checked and documented here once (README "Configuration" lists them).

Paths in a config file are relative to that file; paths given as `key=value` on the command line
are relative to the current directory. Both are made absolute when the config is read, and a run
saves its config with absolute paths, so a run directory means the same thing from anywhere.

A run directory owns its config: `--resume` continues with the saved `config.yaml`, and only the
keys in RESUMABLE (how long to train, how often to log, evaluate and checkpoint) may change.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from feathertune import registry
from feathertune.config import MethodConfig, positive_int
from feathertune.errors import ConfigError

TASKS = ("auto", "causal_lm", "classification")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
QUANTIZATIONS = ("nf4",)
PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")
OBJECTIVES = ("sft", "dpo")
FORMATS = ("auto", "chat", "alpaca", "prompt_completion", "references", "preference", "text", "classification")
SECTIONS = ("adapter", "data", "train", "eval")
LORA_SPELLING = "lora"  # accepted for `adapter:` when the method is LoRA (recipes and runs from before `adapter:`)
_SECTION_KEYS = (*SECTIONS, LORA_SPELLING)
PATH_KEYS = ("output", "data.train", "data.validation")  # `model` too, when it names a path
# What may change when a run resumes: how long it trains and how often it logs, evaluates and
# checkpoints. Everything else would make the resumed run a different run.
RESUMABLE = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "eval.compare_base", "eval.max_new_tokens",
             "eval.batch_size", "eval.samples")
# Keys a run resolves from its data when left at these values ("auto" task, labels from the file).
RESOLVED_BY_THE_RUN = {"task": "auto", "data.labels": None}


@dataclasses.dataclass
class DataConfig:
    train: str = ""  # training file (JSONL, TSV/CSV or TXT)
    validation: str | None = None  # validation file; BLEU/accuracy and samples come from it
    format: str = "auto"  # see feathertune.data: chat, alpaca, prompt_completion, references, preference, text, classification
    validation_format: str = "auto"
    max_length: int = 512  # tokens per example; longer ones are truncated (and counted)
    text_field: str = "text"  # for classification / text JSONL
    label_field: str = "label"
    max_validation: int | None = None  # use only the first N validation examples (faster evaluation)
    labels: list[str] | None = None  # classification: the labels in index order; null: the training file's, sorted

    def problems(self) -> list[str]:
        found = []
        if not self.train or not isinstance(self.train, str):
            found.append("data.train is required: the path of the training file")
        if self.labels is not None and (not isinstance(self.labels, list) or len(self.labels) < 2
                                        or len({str(n) for n in self.labels}) != len(self.labels)
                                        or not all(isinstance(n, (str, int)) for n in self.labels)):
            found.append(f"data.labels={self.labels!r} must be a list of at least two distinct labels, or null")
        for key in ("format", "validation_format"):
            if getattr(self, key) not in FORMATS:
                found.append(f"data.{key}={getattr(self, key)!r} is not one of {', '.join(FORMATS)}")
        found += positive_int("data.max_length", self.max_length)
        if self.max_validation is not None:
            found += positive_int("data.max_validation", self.max_validation)
        return found


@dataclasses.dataclass
class LoopConfig:
    epochs: float = 1  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size·grad_accum·processes
    lr: float = 2e-4  # peak learning rate (LoRA tolerates ~10× full fine-tuning's)
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # decay after warm-up: cosine, linear (to 0) or constant
    optimizer: str = "adamw"  # adamw, adamw_8bit, or (CUDA only) paged_adamw_8bit / paged_adamw_32bit
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null disables
    # bf16 autocast where the hardware multiplies bf16 fast (CUDA GPUs that support it, CPUs with AMX or
    # AVX512-BF16), fp32 elsewhere: without those units bf16 matmuls are several times slower than fp32.
    precision: str = "auto"  # auto, fp32, or bf16
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% slower
    # Speed and memory switches, each the same maths as the plain path (off: for A/B checks).
    sparse_head: bool = True  # output head and cross-entropy only at positions that predict a supervised token
    lean_mlp: bool = True  # gated MLPs keep 2 of their 4 (tokens × intermediate) activations, recompute the rest
    mask_free_attention: bool = True  # right-padded causal batches need no padding mask: SDPA's causal kernel
    distributed: str = "ddp"  # under torchrun: ddp, a model copy per process; fsdp, one shared across them (big bases)
    seed: int = 0  # one seed for init, dropout and data order: same seed, same run
    shuffle: bool = True
    group_by_length: bool = True  # batches of similar lengths: less padding, faster
    eval_every: int = 0  # steps between validation-loss evaluations; 0: only at the end
    checkpoint_every: int = 50  # steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 1  # steps between metrics.jsonl lines
    # sft: cross-entropy on the supervised tokens. dpo (Rafailov et al. 2023): preference pairs (data in the
    # preference format), the reference policy being the base (the adapter disabled).
    objective: str = "sft"
    dpo_beta: float = 0.1  # DPO's β: how far the tuned policy may move from the reference (higher: less far)
    # LP-FT (Kumar et al. 2022): the first N steps train only the new task head (a linear probe), so that
    # the method's parameters then start from a good head instead of being pulled about by a random one.
    lp_steps: int = 0

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.epochs, (int, float)) or isinstance(self.epochs, bool) or self.epochs <= 0:
            found.append(f"train.epochs={self.epochs!r} must be a positive number")
        if self.max_steps is not None:
            found += positive_int("train.max_steps", self.max_steps)
        for key in ("batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            found += positive_int(f"train.{key}", getattr(self, key))
        for key in ("warmup_steps", "eval_every", "checkpoint_every", "seed", "lp_steps"):
            found += _non_negative_int(f"train.{key}", getattr(self, key))
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr < 1:
            found.append(f"train.lr={self.lr!r} must be a number in (0, 1) (typical for LoRA: 1e-4 to 2e-3)")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            found.append(f"train.weight_decay={self.weight_decay!r} must be ≥ 0")
        if self.max_grad_norm is not None and (not isinstance(self.max_grad_norm, (int, float))
                                               or self.max_grad_norm <= 0):
            found.append(f"train.max_grad_norm={self.max_grad_norm!r} must be positive or null")
        if self.optimizer not in OPTIMIZERS:
            found.append(f"train.optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            found.append(f"train.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            found.append(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.objective not in OBJECTIVES:
            found.append(f"train.objective={self.objective!r} is not one of {', '.join(OBJECTIVES)} (sft: learn the "
                         f"answers; dpo: prefer one answer of each pair over the other)")
        if isinstance(self.dpo_beta, bool) or not isinstance(self.dpo_beta, (int, float)) or not self.dpo_beta > 0:
            found.append(f"train.dpo_beta={self.dpo_beta!r} must be a positive number (DPO papers use 0.1 to 0.5)")
        if self.distributed not in DISTRIBUTED:
            found.append(f"train.distributed={self.distributed!r} is not one of {', '.join(DISTRIBUTED)} (ddp: "
                         f"a full copy of the model per process; fsdp: the model sharded across processes)")
        elif self.distributed == "fsdp" and self.optimizer != "adamw" and self.optimizer in OPTIMIZERS:
            found.append(f"train.optimizer={self.optimizer} runs bitsandbytes' kernels on whole tensors, which "
                         f"train.distributed=fsdp shards (DTensors); use train.optimizer=adamw with fsdp, or ddp")
        for key in ("gradient_checkpointing", "shuffle", "group_by_length", "sparse_head", "lean_mlp",
                    "mask_free_attention"):
            if not isinstance(getattr(self, key), bool):
                found.append(f"train.{key}={getattr(self, key)!r} must be true or false")
        return found


@dataclasses.dataclass
class EvalConfig:
    compare_base: bool = True  # also score the base model (adapters disabled) for a before/after
    max_new_tokens: int = 64  # generation length for BLEU and samples
    batch_size: int = 16  # prompts generated at once
    samples: int = 3  # base vs fine-tuned answers shown in samples.md and the summary

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.compare_base, bool):
            found.append(f"eval.compare_base={self.compare_base!r} must be true or false")
        for key in ("max_new_tokens", "batch_size"):
            found += positive_int(f"eval.{key}", getattr(self, key))
        found += _non_negative_int("eval.samples", self.samples)
        return found


@dataclasses.dataclass
class TrainConfig:
    model: str = "smollm2-135m-instruct"  # embedded name, local HF directory, .gguf file or hub id
    method: str = "lora"  # a registry name (lora, ia3, bottleneck, …) or a LoRA variant (dora, rslora, pissa, qlora)
    quantize: str | None = None  # nf4: store the base's linear layers in 4 bits (QLoRA); null: full precision
    task: str = "auto"  # causal_lm or classification; auto: from the data format
    output: str = "runs/latest"  # the run directory
    adapter: MethodConfig = dataclasses.field(default_factory=lambda: registry.METHODS["lora"].config_class())
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.model, str) or not self.model:
            found.append("model is required: an embedded name (smollm2-135m-instruct, minilm-l6), a local "
                         "model directory, a .gguf file or a hub id")
        try:
            spec, _ = registry.resolve_method(self.method)
        except ConfigError as exc:
            found += exc.problems
        else:
            if type(self.adapter) is not spec.config_class:
                found.append(f"adapter is a {type(self.adapter).__name__}, but method={self.method} takes a "
                             f"{spec.config_class.__name__}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            found.append(f"quantize={self.quantize!r} is not one of {', '.join(QUANTIZATIONS)} (or null)")
        if self.task not in TASKS:
            found.append(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        if not isinstance(self.output, str) or not self.output:
            found.append("output is required: the run directory")
        return found

    @property
    def quantization(self) -> str | None:
        """The base's quantization: `quantize`, or nf4 for method qlora."""
        return self.quantize or ("nf4" if self.method == "qlora" else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Every key as `section.key` (or `key` at the top level) -> value."""
        return flatten_values(self.to_dict())

    def with_absolute_paths(self, base: str | os.PathLike = ".") -> TrainConfig:
        """This config with relative paths made absolute against `base` (default: the current directory)."""
        return TrainConfig.from_dict(absolute_paths(self.to_dict(), Path(base)))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build and check a config; every problem in every section is reported in one ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"expected a mapping of keys to values, got {type(values).__name__}", source=source)
        problems: list[str] = []
        values, adapter_prefix, spelling_problems = _adapter_spelling(values)
        problems += spelling_problems
        sections = {"adapter": None, "data": DataConfig, "train": LoopConfig, "eval": EvalConfig}
        top = {k: v for k, v in values.items() if k not in sections}
        built: dict[str, Any] = {}
        for name, section_cls in sections.items():
            section = values.get(name) or {}
            if not isinstance(section, dict):
                problems.append(f"{name} must be a mapping, got {section!r}")
                section = {}
            prefix = f"{name}."
            if name == "adapter":
                section_cls, section, method_problems = _method_section(section, values.get("method", "lora"),
                                                                        adapter_prefix)
                problems += method_problems
                prefix = adapter_prefix
            built[name], section_problems = _build(section_cls, section, prefix=prefix)
            problems += section_problems
        config, top_problems = _build(cls, top, prefix="", nested=built)
        problems += top_problems
        if problems:
            raise ConfigError(problems, source=source)
        return config


def _adapter_spelling(values: dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """Values with `lora:` read as `adapter:`; the prefix to name its keys by; problems."""
    if LORA_SPELLING not in values:
        return values, "adapter.", []
    values = dict(values)
    lora = values.pop(LORA_SPELLING)
    method = values.get("method", "lora")
    problems = []
    known = isinstance(method, str) and method in registry.method_names()
    if known and registry.resolve_method(method)[0].name != "lora":
        problems.append(f"lora: is LoRA's section, but method={method}; give this method's settings in adapter:")
    if "adapter" in values:
        problems.append("the config has both adapter: and lora: (the older spelling of adapter: for LoRA); keep one")
    values["adapter"] = lora
    return values, "lora.", problems


def _method_section(section: dict[str, Any], method: Any, prefix: str) -> tuple[type, dict[str, Any], list[str]]:
    """(the method's config class, the section with what `method` fixes, problems): method: dora
    sets use_dora, …; a section that contradicts its method is a problem. An unknown method is
    reported by TrainConfig itself; its section is then read as LoRA's, to report its own problems."""
    try:
        spec, preset = registry.resolve_method(method)
    except ConfigError:
        return registry.METHODS["lora"].config_class, {}, []
    section, problems = dict(section), []
    for key, value in preset.items():
        if key in section and section[key] != value:
            problems.append(f"method={method} means {prefix}{key}={value!r}, but the config sets "
                            f"{prefix}{key}={section[key]!r}; drop one of the two")
        section[key] = value
    return spec.config_class, section, problems


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; people write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (optional when the overrides give every key needed) and apply
    `dotted.key=value` overrides (values parsed as YAML). Paths are made absolute: those in the file
    against the file's directory, those in overrides against the current directory."""
    values = read_config_file(path) if path is not None else {}
    values = merge_values(values, absolute_paths(parse_overrides(overrides), Path.cwd()))
    return TrainConfig.from_dict(values, source=str(path) if path is not None else "command line")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw values of a YAML config file, with its paths made absolute against its directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file", source=str(path))
    try:
        values = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})", source=str(path)) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}",
                          source=str(path))
    return absolute_paths(values, Path(os.path.abspath(path)).parent)


def resume_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """The config to resume a run with: the run's saved config.yaml, with the RESUMABLE keys that
    `overrides` change. The run directory is `output` from the overrides or the config file.

    A config file given on resume must describe the same run as the saved config, except where an
    override changes a RESUMABLE key. With `output` in neither, the run is where a new one would go.

    Raises:
        ConfigError: no run there, or differences that would make it another run (all listed).
    """
    given_file = read_config_file(path) if path is not None else None
    changes = absolute_paths(parse_overrides(overrides), Path.cwd())
    output = changes.get("output") or (given_file or {}).get("output") or os.path.abspath(TrainConfig.output)
    saved_path = Path(output) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{output}: no run there (no config.yaml, no checkpoint to resume from); run "
                          f"without --resume to start one", source="resume")
    saved = dataclasses.replace(load_config(saved_path), output=str(output))  # the run may have moved
    given = TrainConfig.from_dict(merge_values(saved.to_dict() if given_file is None else given_file, changes),
                                  source=str(path or "command line"))
    changed = resume_changes(saved, given, overridden=set(flatten_values(changes)), where=f"in {path}")
    kept = {key: new for key, (_, new) in changed.items()}
    return TrainConfig.from_dict(merge_values(saved.to_dict(), {**unflatten(kept), "output": str(output)}),
                                 source=str(saved_path))


def resume_changes(saved: TrainConfig, given: TrainConfig, *, overridden: set[str] | None = None,
                   where: str = "in the config given") -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, new value) for each RESUMABLE key that `given` changes in a run saved
    as `saved`. `overridden`: the keys set explicitly; only those may change (None: any RESUMABLE key).

    Raises:
        ConfigError: any other key differs (each one listed with both values).
    """
    before, after = saved.flat(), given.flat()
    changed, refused = {}, []
    for key, value in after.items():
        if key == "output" or value == before[key]:
            continue
        if key in RESOLVED_BY_THE_RUN and value == RESOLVED_BY_THE_RUN[key]:
            continue  # left for the run to resolve; the run resolved it to the saved value
        if key in RESUMABLE and (overridden is None or key in overridden):
            changed[key] = (before[key], value)
        else:
            source = "on the command line" if overridden and key in overridden else where
            refused.append(f"{key}: the run has {before[key]!r}, {source} it is {value!r}")
    if refused:
        refused.append(f"to continue as the run was started, resume with only its directory: feathertune train "
                       f"--resume output={saved.output}; a resumed run may change only {', '.join(RESUMABLE)}")
        raise ConfigError(refused, source=f"resume of {saved.output}")
    return changed


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3"]` -> {"train": {"lr": 0.001}} (YAML typing: numbers, booleans, lists, null)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=1e-3", source="command line")
        try:
            value = parse_yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if key.split(".")[0] == LORA_SPELLING:  # one name for the section, whichever way it was written
            key = "adapter" + key[len(LORA_SPELLING):]
        values = merge_values(values, unflatten({key: value}))
    return values


def merge_values(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it: a section's keys one by one, any other value whole (so
    `lora.rank_pattern={...}` replaces the pattern). A new dict; neither argument is modified."""
    merged = dict(base)
    spelled = {"adapter": LORA_SPELLING, LORA_SPELLING: "adapter"}
    for key, value in changes.items():
        if key in spelled and spelled[key] in merged and key not in merged:
            key = spelled[key]  # `lora.r=4` over a file's adapter: section, or the other way round
        if key in _SECTION_KEYS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def flatten_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of unflatten, for the config's sections (a section's own dict values stay whole)."""
    flat = {}
    for key, value in values.items():
        if not prefix and key in _SECTION_KEYS and isinstance(value, dict):
            flat.update(flatten_values(value, prefix=f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def absolute_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Raw config values with the paths in them (PATH_KEYS, and `model` when it names a local
    path rather than an embedded model or a hub id) made absolute against `base`."""
    flat = flatten_values(values)
    for key in PATH_KEYS:
        if isinstance(flat.get(key), str) and flat[key]:
            flat[key] = os.path.abspath(base / Path(flat[key]).expanduser())
    if isinstance(flat.get("model"), str) and flat["model"]:
        flat["model"] = _model_path(flat["model"], base)
    return merge_values(values, unflatten({k: v for k, v in flat.items() if k in (*PATH_KEYS, "model")}))


def _model_path(model: str, base: Path) -> str:
    """An absolute path for a model named by a path; embedded names and hub ids unchanged."""
    from feathertune.models import EMBEDDED

    path = Path(model).expanduser()
    if model in EMBEDDED or path.is_absolute():
        return str(path)
    if model.startswith(("./", "../", "~")) or path.suffix == ".gguf" or (base / path).exists():
        return os.path.abspath(base / path)
    return model  # a hub id (org/name)


def _build(cls, values: dict[str, Any], prefix: str, nested: dict[str, Any] | None = None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    for key in values:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            problems.append(f"unknown key {prefix}{key}{suggestion}; known: {', '.join(prefix + f for f in fields)}")
    obj = cls.__new__(cls)
    for name, f in fields.items():
        if nested and name in nested:
            value = nested[name]
        elif name in values:
            value = values[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(obj, name, value)
    if issubclass(cls, MethodConfig):  # its problems name bare fields
        problems += [f"{prefix}{p}" for p in obj.problems()]
    else:
        problems += obj.problems()
    return obj, problems


def _non_negative_int(name: str, value: Any) -> list[str]:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return [f"{name}={value!r} must be an integer ≥ 0"]
    return []
