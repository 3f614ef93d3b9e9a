"""A fine-tuning job, from OpenAI's request body to feathertune's TrainConfig.

    POST /v1/fine_tuning/jobs {model, training_file, validation_file, suffix, seed, metadata,
                               method: {type: supervised, supervised: {hyperparameters: {...}}},
                               hyperparameters (deprecated), feathertune: {method, adapter, ...}}
        → new_job_row()      checked now: a bad body is a 400, before any job exists
        → train_config()     at run time, with the files' paths and the data's size known

OpenAI's hyperparameters map onto the loop: n_epochs → train.epochs, batch_size → train.batch_size,
learning_rate_multiplier → train.lr = multiplier × the method's learning rate. "auto" resolves
once the training file's size is known, and the job then reports the values it used, as OpenAI's do.
The `feathertune` field carries what OpenAI's API has no words for (PEFT method, rank, targets,
quantization, loop settings); it may not name a path, a model or an output: the server picks those.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from feathertune.errors import ConfigError
from feathertune.train.config import LoopConfig, TrainConfig, merge_values
from feathertune.service.openai_objects import ApiError

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
AUTO_EPOCHS = 3  # OpenAI's default for small files
OPTION_SECTIONS = {"method", "adapter", "lora", "quantize", "task", "train", "data", "eval"}
SERVER_CHOSEN = {"data": {"train", "validation"}}  # paths: the server's, never a request's
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
    check_options(options)
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
    """OpenAI's `method` object, from `method` or the deprecated top-level `hyperparameters`."""
    method = body.get("method")
    legacy = body.get("hyperparameters")
    if method is None:
        method = {"type": "supervised", "supervised": {"hyperparameters": legacy or {}}}
    if not isinstance(method, dict) or method.get("type") != "supervised":
        kind = method.get("type") if isinstance(method, dict) else method
        raise ApiError(400, f"method.type={kind!r} is not supported; use 'supervised' (DPO comes with issue 12)",
                       param="method.type")
    # A misplaced key (method.hyperparameters) or a section that is not an object would otherwise be
    # ignored, and the job trained with "auto" where the client asked for values.
    unknown = sorted(set(method) - {"type", "supervised"})
    if unknown:
        raise ApiError(400, f"method: unknown key(s) {unknown}; a supervised method is "
                       f"{{'type': 'supervised', 'supervised': {{'hyperparameters': {{...}}}}}}", param="method")
    section = {} if method.get("supervised") is None else method["supervised"]
    if not isinstance(section, dict) or sorted(set(section) - {"hyperparameters"}):
        raise ApiError(400, f"method.supervised={section!r} must be an object with (only) 'hyperparameters'",
                       param="method.supervised")
    hyper = section.get("hyperparameters")
    hyper = {} if hyper is None else hyper
    if not isinstance(hyper, dict):
        raise ApiError(400, "method.supervised.hyperparameters must be an object", param="method.supervised.hyperparameters")
    unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
    if unknown:
        raise ApiError(400, f"unknown hyperparameter(s) {unknown}; OpenAI's are {', '.join(HYPERPARAMETERS)} "
                       f"(feathertune's own settings go in the 'feathertune' field)", param="hyperparameters")
    limits = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-6, 100.0)}
    resolved = {}
    for key, (kind, low, high) in limits.items():
        value = hyper.get(key, "auto")
        ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and (kind is float or float(value).is_integer()) and low <= value <= high)
        if not ok:
            raise ApiError(400, f"{key}={value!r}: use 'auto' or a number from {low} to {high}",
                           param=f"method.supervised.hyperparameters.{key}")
        resolved[key] = value if value == "auto" else kind(value)
    return {"type": "supervised", "supervised": {"hyperparameters": resolved}}


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
        named = sorted(set(options.get(section) or {}) & keys)
        if named:
            raise ApiError(400, f"feathertune.{section}: {named} are chosen by the server (upload files with "
                           f"POST /v1/files and name them as training_file / validation_file)",
                           param=f"feathertune.{section}")
    return options


def check_options(options: dict[str, Any]) -> None:
    """Build a TrainConfig from the options with placeholder paths: any ConfigError is a 400 now."""
    try:
        TrainConfig.from_dict(merge_values(merge_values(SERVICE_DEFAULTS, options),
                                           {"data": {"train": "train.jsonl"}, "output": "run"}), source="feathertune")
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="feathertune", code="invalid_config") from None


def resolved_hyperparameters(job: dict[str, Any], train_examples: int) -> dict[str, Any]:
    """The job's hyperparameters with every "auto" chosen for a training file of this size."""
    hyper = dict(job["method"]["supervised"]["hyperparameters"])
    if hyper["batch_size"] == "auto":  # about 0.2 % of the file, as OpenAI's auto does, within 1..8
        hyper["batch_size"] = max(1, min(8, math.ceil(train_examples * 0.002)))
    max_steps = (job["options"].get("train") or {}).get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:  # feathertune's max_steps wins: report the epochs it makes
        hyper["n_epochs"] = max(1, math.ceil(max_steps * hyper["batch_size"] / max(train_examples, 1)))
    elif hyper["n_epochs"] == "auto":
        hyper["n_epochs"] = AUTO_EPOCHS
    if hyper["learning_rate_multiplier"] == "auto":
        hyper["learning_rate_multiplier"] = 1.0
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
                  "lr": base_lr * hyper["learning_rate_multiplier"]})
    values = merge_values(options, {"model": model_source, "output": output, "train": train,
                                    "data": {"train": train_path, "validation": validation_path}})
    config = TrainConfig.from_dict(values, source=f"job {job['id']}")
    steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    return config, hyper, steps


def fine_tuned_name(job: dict[str, Any], step: int | None = None) -> str:
    """ft:<base>:<suffix>:<job id>, and :ckpt-step-<N> for a checkpoint — OpenAI's pattern."""
    name = f"ft:{job['model']}:{job['suffix'] or ''}:{job['id']}"
    return name if step is None else f"{name}:ckpt-step-{step}"
