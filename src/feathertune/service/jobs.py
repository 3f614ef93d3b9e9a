"""A fine-tuning job, from OpenAI's request body to feathertune's TrainConfig.

    POST /v1/fine_tuning/jobs {model, training_file, validation_file, suffix, seed, metadata,
                               method: {type: supervised | dpo, <type>: {hyperparameters: {...}}},
                               hyperparameters (deprecated: supervised), feathertune: {method, adapter, ...}}
        → new_job_row()      checked now: a bad body is a 400, before any job exists
        → check_file_kinds() and the files' first records: pairs for dpo, no pairs for supervised (400)
        → train_config()     at run time, with the files' paths and the data's size known

OpenAI's method type is the run's objective: supervised → train.objective=sft, dpo → train.objective=dpo
(Rafailov et al. 2023) with beta → train.dpo_beta. The hyperparameters both types share map onto the
loop: n_epochs → train.epochs, batch_size → train.batch_size, learning_rate_multiplier → train.lr =
multiplier × the method's learning rate. "auto" resolves once the training file's size is known, and
the job then reports the values it used, as OpenAI's do.
The `feathertune` field carries what OpenAI's API has no words for (PEFT method, rank, targets,
quantization, loop settings); it may not name a path, a model or an output (the server picks those),
nor the objective (the method's type says it).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from feathertune.data.formats import KINDS, PREFERENCE_HINT, PREFERENCE_KEYS, TABLE_DELIMITERS
from feathertune.errors import ConfigError
from feathertune.train.config import LoopConfig, TrainConfig, merge_values
from feathertune.service.openai_objects import ApiError

OBJECTIVES = {"supervised": "sft", "dpo": "dpo"}  # OpenAI's method types this server trains → train.objective
OPENAI_METHOD_TYPES = ("supervised", "dpo", "reinforcement")  # what the client may send
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("beta", "n_epochs", "batch_size", "learning_rate_multiplier")}
# (type, lowest, highest); beta's lowest is excluded: it must be positive (train.dpo_beta > 0)
LIMITS = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-6, 100.0),
          "beta": (float, 0.0, 100.0)}
AUTO_EPOCHS = 3  # OpenAI's default for small files
AUTO_BETA = 0.1  # TRL's and the DPO paper's β; train.dpo_beta's default
OPTION_SECTIONS = {"method", "adapter", "lora", "quantize", "task", "train", "data", "eval"}
SERVER_CHOSEN = {"data": {"train", "validation"}}  # paths: the server's, never a request's
METHOD_CHOSEN = {"train": {"objective", "dpo_beta"}}  # OpenAI's `method` says these
DATA_FORMAT = {"training_file": "format", "validation_file": "validation_format"}  # feathertune.data's keys
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
# Defaults for a service job that differ from the CLI's: no base-model comparison (it doubles the
# evaluation) and a checkpoint per epoch, as OpenAI keeps them.
SERVICE_DEFAULTS = {"eval": {"compare_base": False, "samples": 0}}


def new_job_row(body: dict[str, Any], *, job_id: str, models: set[str], files: dict[str, dict]) -> dict[str, Any]:
    """The store row of a new job, or ApiError(400/404) naming the field that is wrong.

    Args:
        models: the base models this server serves.
        files: the uploaded files the body names (id → row); a missing one is a 404.
    """
    model = _required_str(body, "model")
    if model not in models:
        raise ApiError(404, f"The model {model!r} does not exist or is not a base model this server fine-tunes; "
                       f"it serves {', '.join(sorted(models))}", param="model", code="model_not_found")
    for param in ("training_file", "validation_file"):
        file_id = body.get(param)
        if param == "training_file" or file_id is not None:
            if not isinstance(file_id, str) or not file_id:
                raise ApiError(400, f"{param} must be a file id (from POST /v1/files)", param=param,
                               code="invalid_request_error")
            if file_id not in files:
                raise ApiError(404, f"No such file: {file_id!r}", param=param, code="file_not_found")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise ApiError(400, "suffix must be up to 64 letters, digits, '-' or '_'", param="suffix")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
        raise ApiError(400, "seed must be an integer from 0 to 2147483647", param="seed")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise ApiError(400, "metadata must be up to 16 string keys (64 chars) with string values (512 chars)",
                       param="metadata")
    method = _method(body)
    options = _options(body.get("feathertune"))
    check_options(options, OBJECTIVES[method["type"]])
    return {"id": job_id, "model": model, "training_file": body["training_file"],
            "validation_file": body.get("validation_file"), "suffix": suffix,
            "seed": seed if seed is not None else int.from_bytes(os.urandom(4), "big") % 2**31,
            "metadata": metadata, "method": method, "options": options, "status": "validating_files",
            "requested": None, "error": None, "fine_tuned_model": None, "finished_at": None,
            "trained_tokens": None, "estimated_finish": None, "result_files": []}


def _required_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"Missing required parameter: {key!r}", param=key, code="missing_required_parameter")
    return value


def _method(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method` object, checked, with "auto" for every hyperparameter it leaves out; from the
    deprecated top-level `hyperparameters` (a supervised job's) when there is no `method`."""
    method = body.get("method")
    where = f"method.{method.get('type')}.hyperparameters" if isinstance(method, dict) else "hyperparameters"
    if method is None:
        method = {"type": "supervised", "supervised": {"hyperparameters": body.get("hyperparameters") or {}}}
    if not isinstance(method, dict):
        raise ApiError(400, f"method={method!r} must be an object: {_method_shape('dpo')}", param="method")
    kind = method.get("type")
    if not isinstance(kind, str) or kind not in OBJECTIVES:
        why = " (it needs graders, which this server does not have)" if kind == "reinforcement" else ""
        raise ApiError(400, f"method.type={kind!r} is not supported{why}; use one of {', '.join(OBJECTIVES)}",
                       param="method.type")
    # A misplaced key (method.hyperparameters) or another type's section (method.dpo under type
    # supervised) would otherwise be ignored, and the job trained otherwise than the client asked.
    # Another type's section set to null is what a job object sent back holds: harmless.
    for key in sorted(set(method) - {"type", kind}):
        if key not in OPENAI_METHOD_TYPES:
            raise ApiError(400, f"method: unknown key {key!r}; a {kind} method is {_method_shape(kind)}",
                           param="method")
        if method[key] is not None:
            raise ApiError(400, f"method.{key} is given but method.type is {kind!r}: a {key} section belongs to "
                           f"{_method_shape(key)}, a {kind} job's to {_method_shape(kind)}", param=f"method.{key}")
    section = {} if method.get(kind) is None else method[kind]
    if not isinstance(section, dict) or sorted(set(section) - {"hyperparameters"}):
        raise ApiError(400, f"method.{kind}={section!r} must be an object with (only) 'hyperparameters'",
                       param=f"method.{kind}")
    hyper = {} if section.get("hyperparameters") is None else section["hyperparameters"]
    if not isinstance(hyper, dict):
        raise ApiError(400, f"method.{kind}.hyperparameters must be an object", param=f"method.{kind}.hyperparameters")
    allowed = HYPERPARAMETERS[kind]
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        hint = " (beta is DPO's: method.type 'dpo')" if "beta" in unknown else ""
        raise ApiError(400, f"unknown hyperparameter(s) {unknown}{hint}; a {kind} job's are {', '.join(allowed)} "
                       f"(feathertune's own settings go in the 'feathertune' field)", param=where)
    resolved = {key: _hyperparameter(key, hyper.get(key, "auto"), f"{where}.{key}") for key in allowed}
    return {"type": kind, kind: {"hyperparameters": resolved}}


def _hyperparameter(key: str, value: Any, param: str) -> Any:
    """"auto", or the value as its type if it lies within LIMITS[key]; else ApiError(400)."""
    if value == "auto":
        return value
    kind, low, high = LIMITS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    in_range = number and (low < value if key == "beta" else low <= value) and value <= high
    if in_range and (kind is float or float(value).is_integer()):
        return kind(value)
    allowed = f"a positive number up to {high}" if key == "beta" else f"a number from {low} to {high}"
    raise ApiError(400, f"{key}={value!r}: use 'auto' or {allowed}", param=param)


def _method_shape(kind: str) -> str:
    return f"{{'type': '{kind}', '{kind}': {{'hyperparameters': {{...}}}}}}"


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "feathertune must be an object of training-config sections", param="feathertune")
    unknown = sorted(set(options) - OPTION_SECTIONS)
    if unknown:
        raise ApiError(400, f"feathertune: unknown key(s) {unknown}; allowed: {', '.join(sorted(OPTION_SECTIONS))} "
                       f"(the model, data paths and output are the server's)", param="feathertune")
    for section, keys in SERVER_CHOSEN.items():
        named = sorted(set(_section(options, section)) & keys)
        if named:
            raise ApiError(400, f"feathertune.{section}: {named} are chosen by the server (upload files with "
                           f"POST /v1/files and name them as training_file / validation_file)",
                           param=f"feathertune.{section}")
    for section, keys in METHOD_CHOSEN.items():
        named = sorted(set(_section(options, section)) & keys)
        if named:
            raise ApiError(400, f"feathertune.{section}: {named} are set by the job's method: "
                           f"{_method_shape('dpo')} trains with train.objective=dpo and dpo_beta=beta, "
                           f"{_method_shape('supervised')} with objective=sft", param=f"feathertune.{section}")
    return options


def _section(options: dict[str, Any], name: str) -> dict[str, Any]:
    """A section of the options as a dict ({} if it is not one: TrainConfig reports that)."""
    section = options.get(name)
    return section if isinstance(section, dict) else {}


def check_options(options: dict[str, Any], objective: str = "sft") -> None:
    """Build a TrainConfig from the options with placeholder paths: any ConfigError is a 400 now."""
    values = merge_values(SERVICE_DEFAULTS, options)
    placeholders: dict[str, Any] = {"data": {"train": "train.jsonl"}, "output": "run"}
    if isinstance(values.get("train", {}), dict):  # else TrainConfig says what `train` must be
        placeholders["train"] = {"objective": objective}
    try:
        TrainConfig.from_dict(merge_values(values, placeholders), source="feathertune")
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="feathertune", code="invalid_config") from None


def resolved_method(job: dict[str, Any], train_examples: int) -> dict[str, Any]:
    """The job's `method` object with every "auto" chosen for a training file of this size."""
    kind = job["method"]["type"]
    return {"type": kind, kind: {"hyperparameters": resolved_hyperparameters(job, train_examples)}}


def resolved_hyperparameters(job: dict[str, Any], train_examples: int) -> dict[str, Any]:
    """The job's hyperparameters with every "auto" chosen for a training file of this size
    (a preference file's examples are its pairs)."""
    method = job["method"]
    hyper = dict(method[method["type"]]["hyperparameters"])
    if hyper["batch_size"] == "auto":  # about 0.2 % of the file, as OpenAI's auto does, within 1..8
        hyper["batch_size"] = max(1, min(8, math.ceil(train_examples * 0.002)))
    max_steps = (job["options"].get("train") or {}).get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:  # feathertune's max_steps wins: report the epochs it makes
        hyper["n_epochs"] = max(1, math.ceil(max_steps * hyper["batch_size"] / max(train_examples, 1)))
    elif hyper["n_epochs"] == "auto":
        hyper["n_epochs"] = AUTO_EPOCHS
    if hyper["learning_rate_multiplier"] == "auto":
        hyper["learning_rate_multiplier"] = 1.0
    if hyper.get("beta") == "auto":
        hyper["beta"] = AUTO_BETA
    return hyper


def train_config(job: dict[str, Any], *, model_source: str, train_path: str, validation_path: str | None,
                 output: str, train_examples: int) -> tuple[TrainConfig, dict[str, Any], int]:
    """The run's TrainConfig, the resolved hyperparameters and the number of steps it trains."""
    hyper = resolved_hyperparameters(job, train_examples)
    options = merge_values(SERVICE_DEFAULTS, job["options"])
    train = dict(options.get("train") or {})
    base_lr = train.get("lr", LoopConfig.lr)  # the options were checked at create: a number, if given
    steps_per_epoch = max(1, math.ceil(train_examples / hyper["batch_size"]))
    train.setdefault("checkpoint_every", steps_per_epoch)  # one per epoch, as OpenAI keeps them
    train.setdefault("keep_checkpoints", 3)  # the worker copies each out; 3 leave it time to between polls
    if validation_path is not None:
        train.setdefault("eval_every", train["checkpoint_every"])  # each checkpoint gets a valid_loss
    train.update({"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"], "seed": job["seed"],
                  "lr": base_lr * hyper["learning_rate_multiplier"], "objective": OBJECTIVES[job["method"]["type"]]})
    if "beta" in hyper:
        train["dpo_beta"] = hyper["beta"]
    values = merge_values(options, {"model": model_source, "output": output, "train": train,
                                    "data": {"train": train_path, "validation": validation_path}})
    config = TrainConfig.from_dict(values, source=f"job {job['id']}")
    steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    return config, hyper, steps


def fine_tuned_name(job: dict[str, Any], step: int | None = None) -> str:
    """ft:<base>:<suffix>:<job id>, and :ckpt-step-<N> for a checkpoint — OpenAI's pattern."""
    name = f"ft:{job['model']}:{job['suffix'] or ''}:{job['id']}"
    return name if step is None else f"{name}:ckpt-step-{step}"


# -- the files fit the method: preference pairs for dpo, and only for dpo -----------------------------
def check_file_kinds(job: dict[str, Any], files: dict[str, dict], path_of: Callable[[dict], Path]) -> None:
    """ApiError(400) now for a training or validation file that does not fit the job's method, as
    told by its first record (or by feathertune.data's format). The worker's full read, later, has the
    last word on the rest of the file; a first record that tells nothing is left to it.

    Args:
        files: the uploaded files the job names (id → row); path_of(row): where that file's bytes are.
    """
    for param in ("training_file", "validation_file"):
        row = files.get(job[param]) if job[param] else None
        if row is None:
            continue
        format = _section(job["options"], "data").get(DATA_FORMAT[param], "auto")
        told = _read_as_pairs(path_of(row), format, DATA_FORMAT[param])
        if told is not None and (problem := file_kind_problem(job, param, row, *told)):
            raise ApiError(400, problem, param=param, code=f"invalid_{param}")


def file_kind_problem(job: dict[str, Any], param: str, row: dict, pairs: bool, seen: str) -> str | None:
    """Why a file that holds preference pairs (`pairs`) cannot train this job, or None if it can.
    `seen`: how that was told ("its first record's keys are ..."), for the message."""
    kind = job["method"]["type"]
    label = f"{param} {row['id']} ({row['filename']})"
    if kind == "dpo" and not pairs:
        return (f"{label} holds no preference pairs ({seen}), but a dpo job learns from pairs, one a line: "
                f"{PREFERENCE_HINT}")
    if kind != "dpo" and pairs:
        return (f"{label} holds preference pairs ({seen}), which a {kind} job does not learn from; give "
                f"chat examples, or create the job with method={_method_shape('dpo')}")
    return None


def _read_as_pairs(path: Path, format: str, key: str) -> tuple[bool, str] | None:
    """Whether `read_examples(path, format)` reads preference pairs, and how that shows; None where
    the first record cannot tell (a file that is not JSON lines, empty, missing: the worker says why).
    "auto" decides as read_examples does: by extension, then by the first record's keys."""
    if format != "auto":
        return KINDS.get(format) == "preference", f"feathertune.data.{key} is {format!r}"
    extension = path.suffix.lower()
    if extension in TABLE_DELIMITERS or extension == ".txt":
        return False, f"a {extension} file holds {'text' if extension == '.txt' else 'classification'} examples"
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            first = next((line for line in lines if line.strip()), None)
        record = json.loads(first) if first is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    keys = ", ".join(sorted(record)) or "none"
    return bool(set(record) & set(PREFERENCE_KEYS)), f"its first record's keys are {keys}"
