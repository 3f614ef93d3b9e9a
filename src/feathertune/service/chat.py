"""The chat-completions engine under `feathertune serve`: many requests, one model per base, batched.

    complete()/stream() ──► queue ──► one worker thread (owns every model; torch is not thread-safe here)
                                        wait ≤ batch_window_s for company, take ≤ max_batch of one base
                                        load the rows' adapters onto that base (LRU, never the base again)
                                        one batch, one adapter per row (`adapter_names=`), for the methods
                                        that mix; a batch of its own (`set_active`) for those that don't
                                        prefill + token-by-token decode with the KV cache
             ◄── text deltas, then one ChatResult, per request

Each row comes out as it would decoded alone: left padding with an attention mask and position ids
counted from each row's first real token (what HF `generate` does), and rows leave the batch (and
the KV cache) as soon as they finish. Independent of HTTP: the app maps `ConfigError` to 400.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feathertune.adapters import adapter_state, delete_adapter, set_active
from feathertune.checkpoint import load_adapter
from feathertune.errors import ConfigError
from feathertune.evaluate import eos_ids
from feathertune.registry import spec_for
from feathertune.wrapping import BASE, CACHE_ARGUMENTS

DEFAULT_MAX_TOKENS = 256  # when a request gives none (and the context has room for that many)
MAX_STOP_STRINGS = 4  # OpenAI's limit
# A temperature this small is greedy in all but name, and logits / 1e-300 overflow to inf and NaN.
GREEDY_BELOW = 1e-4


@dataclass
class ChatRequest:
    """One chat completion: which model (a base, or an adapter on it), the conversation, sampling."""

    base: str  # base model name, passed to load_base
    adapter: Path | None  # adapter directory (PEFT layout); None = the base itself
    adapter_key: str  # unique, stable key of that adapter (the LRU's); any characters
    messages: list[dict]  # OpenAI chat messages [{"role": ..., "content": str}], validated by the app
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or the room left in the context
    temperature: float = 1.0  # 0: greedy; OpenAI's default is 1
    top_p: float = 1.0  # nucleus sampling: sample from the smallest set of tokens with this much mass
    stop: list[str] = field(default_factory=list)  # ≤ 4; the text is cut before the first one
    seed: int | None = None  # the same seed (and request) samples the same text


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop" (an eos token or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, an ending eos included


@dataclass
class EngineStats:
    """What the worker has run so far (written by the worker thread only)."""

    batches: int = 0  # decode batches (one per prefill)
    rows: int = 0  # requests decoded in them
    forwards: int = 0  # model calls (prefills and decode steps)

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class ChatEngine:
    """Serves chat completions for base models and the adapters trained on them, batching requests.

    Thread-safe: call `complete` or `stream` from any number of threads. One background thread owns
    the models; `close()` stops it (after the batch in progress) and fails the requests still queued.

    Args:
        load_base: base name -> (model, tokenizer); called once per base, on its first request.
        max_adapters: adapters kept loaded per base; the least recently used one goes first.
        max_batch: rows decoded together at most.
        batch_window_s: how long the first request of a batch waits for others to join it.
    """

    def __init__(self, load_base: Callable[[str], tuple[nn.Module, Any]], *, max_adapters: int = 8,
                 max_batch: int = 16, batch_window_s: float = 0.02):
        problems = [f"{name}={value!r} must be a positive integer" for name, value in
                    (("max_adapters", max_adapters), ("max_batch", max_batch))
                    if not isinstance(value, int) or isinstance(value, bool) or value < 1]
        if not isinstance(batch_window_s, (int, float)) or batch_window_s < 0:
            problems.append(f"batch_window_s={batch_window_s!r} must be a number of seconds >= 0, e.g. 0.02")
        if problems:
            raise ConfigError(problems, source="ChatEngine")
        self._load_base = load_base
        self.max_adapters, self.max_batch, self.batch_window_s = max_adapters, max_batch, batch_window_s
        self.stats = EngineStats()
        self._bases: dict[str, _Base] = {}
        self._pending: list[_Job] = []
        self._forgotten: set[str] = set()  # adapter keys to unload, by the worker
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="feathertune-chat", daemon=True)
        self._thread.start()

    # --- the callers' side (any thread) -----------------------------------------------------------

    def complete(self, request: ChatRequest) -> ChatResult:
        """The whole completion, once decoded (blocks the calling thread).

        Raises:
            ConfigError: a bad request (sampling settings, a prompt longer than the context, ...).
            FileNotFoundError: the adapter directory or one of its files is missing.
            RuntimeError: the engine is closed. Whatever load_base or load_adapter raise passes through
                (e.g. AdapterMismatchError for an adapter of another base).
        """
        events = self._events(self._submit(request, streaming=False))
        return next(event for event in events if isinstance(event, ChatResult))

    def stream(self, request: ChatRequest) -> Iterator[str | ChatResult]:
        """Text deltas as they are decoded, then exactly one ChatResult (its text is the deltas joined).

        The request is queued at once; errors about the settings raise here, errors that need the
        model (prompt too long, missing adapter) from the first `next()`, before any text. Closing
        the iterator early (a client gone) drops the row from its batch.
        """
        return self._events(self._submit(request, streaming=True))

    def loaded(self) -> dict[str, list[str]]:
        """Base name -> the adapter keys loaded onto it, least recently used first."""
        with self._wakeup:
            bases = dict(self._bases)
        return {name: base.adapter_keys() for name, base in bases.items()}

    def forget(self, adapter_key: str) -> None:
        """Unload adapter `adapter_key` from every base (say, its fine-tuned model was deleted).

        Returns at once; the worker drops it before its next batch. A later request loads it again.
        """
        with self._wakeup:
            self._forgotten.add(adapter_key)
            self._wakeup.notify_all()

    def close(self) -> None:
        """Stop the worker thread (it finishes the batch in progress); queued requests fail.

        Idempotent. The models stay referenced by the engine until it is garbage collected.
        """
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._thread.join()

    def _submit(self, request: ChatRequest, streaming: bool) -> _Job:
        problems = _request_problems(request)
        if problems:
            raise ConfigError(problems, source="chat completion request")
        job = _Job(request, streaming)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the chat engine is closed; create a new ChatEngine")
            self._pending.append(job)
            self._wakeup.notify_all()
        return job

    @staticmethod
    def _events(job: _Job) -> Iterator[str | ChatResult]:
        try:
            while True:
                event = job.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, ChatResult):
                    return
        finally:
            job.cancelled = True  # a no-op once finished; else the worker drops the row

    # --- the worker thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while (work := self._next_work()) is not None:
                forgotten, group = work
                for base in list(self._bases.values()):
                    base.drop(forgotten)
                try:
                    self._run_group(group)
                except Exception as exc:  # a bug or out-of-memory fails these requests, not the engine
                    for job in group:
                        job.fail(exc)
        finally:  # however the thread ends, no caller is left waiting
            with self._wakeup:
                self._closed = True
                left, self._pending = self._pending, []
            for job in left:
                job.fail(RuntimeError("the chat engine was closed before this request ran"))

    def _next_work(self) -> tuple[set[str], list[_Job]] | None:
        """(adapter keys to unload, up to max_batch queued requests for one base, once the oldest has
        waited its window); None once closed."""
        with self._wakeup:
            while not self._pending and not self._forgotten and not self._closed:
                self._wakeup.wait()
            forgotten, self._forgotten = self._forgotten, set()
            if forgotten and not self._pending:
                return forgotten, []
            # The window counts from the oldest request's arrival: work that piled up during the
            # previous batch starts at once.
            deadline = self._pending[0].arrived + self.batch_window_s if self._pending else 0.0
            while not self._closed and len(self._pending) < self.max_batch and time.monotonic() < deadline:
                self._wakeup.wait(deadline - time.monotonic())
            if self._closed:
                return None
            return forgotten, self._take_group()

    def _take_group(self) -> list[_Job]:
        """Remove and return the oldest request's base's requests (queue order), within the limits:
        max_batch rows, and at most max_adapters different adapters (so none is evicted mid-batch)."""
        base = self._pending[0].request.base
        group, adapters = [], set()
        for job in self._pending:
            request = job.request
            if request.base != base or len(group) == self.max_batch:
                continue
            key = request.adapter_key if request.adapter is not None else None
            if key is not None and key not in adapters:
                if len(adapters) == self.max_adapters:
                    continue
                adapters.add(key)
            group.append(job)
        taken = {id(job) for job in group}
        self._pending = [job for job in self._pending if id(job) not in taken]
        return group

    def _run_group(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.cancelled]  # their callers left while they waited
        if not jobs:
            return
        base = self._base(jobs[0].request.base, jobs)
        if base is None:
            return
        needed = {j.request.adapter_key for j in jobs if j.request.adapter is not None}
        rows = []
        for job in jobs:
            try:
                name = base.adapter_name(job.request, needed)
                rows.append(_Row.prepare(base, job, name))
            except Exception as exc:  # a missing adapter, a too-long prompt: this request's problem only
                job.fail(exc)
        with torch.inference_mode():
            for names, batch in base.batches(rows):
                # Counted before decoding, so that a caller holding its result sees its batch counted.
                self.stats.batches += 1
                self.stats.rows += len(batch)
                self.stats.forwards += decode(base, batch, names)

    def _base(self, name: str, jobs: list[_Job]) -> _Base | None:
        """The base model `name`, loaded on first use; None (the jobs failed) if it cannot be."""
        base = self._bases.get(name)
        if base is None:
            try:
                model, tokenizer = self._load_base(name)
                base = _Base(name, model, tokenizer, self.max_adapters)
            except Exception as exc:  # an unknown base is the requests' problem, not the engine's
                for job in jobs:
                    job.fail(exc)
                return None
            with self._wakeup:
                self._bases[name] = base
        return base


@dataclass(eq=False)
class _Job:
    """A request on its way through the engine; `events` carries deltas, the result or the error."""

    request: ChatRequest
    streaming: bool
    arrived: float = field(default_factory=time.monotonic)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False  # the caller stopped listening
    done: bool = False

    def finish(self, result: ChatResult) -> None:
        self.done = True
        self.events.put(result)

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.events.put(error)


def _request_problems(request: ChatRequest) -> list[str]:
    """Everything wrong with a request's settings that can be told without the model."""
    found = []
    if not isinstance(request.messages, list) or not request.messages:
        found.append(f"messages is a {type(request.messages).__name__}"
                     f"{' (empty)' if request.messages == [] else ''}; give a non-empty list of chat messages")
    tokens = request.max_tokens
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        found.append(f"max_tokens={tokens!r} must be a positive integer (or None for as many as fit)")
    if not isinstance(request.temperature, (int, float)) or not 0 <= request.temperature <= 2:
        found.append(f"temperature={request.temperature!r} must be between 0 (greedy) and 2")
    if not isinstance(request.top_p, (int, float)) or not 0 < request.top_p <= 1:
        found.append(f"top_p={request.top_p!r} must be in (0, 1]")
    stop = request.stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS \
            or not all(isinstance(s, str) and s for s in stop):
        found.append(f"stop={stop!r} must be a list of up to {MAX_STOP_STRINGS} non-empty strings")
    if request.seed is not None and (not isinstance(request.seed, int) or isinstance(request.seed, bool)):
        found.append(f"seed={request.seed!r} must be an integer or None")
    return found


class _Base:
    """One base model in memory and the adapters loaded onto it, least recently used first."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, max_adapters: int):
        self.name, self.model, self.tokenizer = name, model.eval(), tokenizer
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # the engine owns its tokenizer: nothing to restore
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked anyway
        self.eos = set(eos_ids(model, tokenizer))
        config = getattr(model, "config", None)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.context = getattr(text_config, "max_position_embeddings", None)  # None: no known limit
        self.device = next(model.parameters()).device
        parameters = inspect.signature(model.forward).parameters
        self.cache_key = next((k for k in CACHE_ARGUMENTS if k in parameters), CACHE_ARGUMENTS[-1])
        # The prefill needs the logits of the last position only, not (B, T, vocab).
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter_key -> the name on the model
        self._lock = threading.Lock()  # loaded() reads the LRU from other threads
        self._names = itertools.count()

    def adapter_keys(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def adapter_name(self, request: ChatRequest, needed: set[str]) -> str:
        """The request's adapter's name on the model (BASE for the base), loading it if it is not.

        Keys are any text, the library's names are not, so each load gets a fresh name "a0", "a1"...
        """
        if request.adapter is None:
            return BASE
        key = request.adapter_key
        with self._lock:
            if key in self._adapters:
                self._adapters.move_to_end(key)
                return self._adapters[key]
        if not Path(request.adapter).is_dir():  # before evicting anything for it
            raise FileNotFoundError(f"adapter directory {str(request.adapter)!r} of {key!r} does not exist")
        self._make_room(needed)
        name = f"a{next(self._names)}"
        load_adapter(self.model, request.adapter, name=name, trainable=False)
        self.model.eval()
        with self._lock:
            self._adapters[key] = name
        return name

    def drop(self, keys: set[str]) -> None:
        """Unload the adapters of these keys, those that are loaded."""
        for key in [k for k in self._adapters if k in keys]:
            delete_adapter(self.model, self._adapters[key])
            with self._lock:
                del self._adapters[key]

    def _make_room(self, needed: set[str]) -> None:
        """Evict least recently used adapters (not one this batch needs) until one more fits."""
        while len(self._adapters) >= self.max_adapters:
            victim = next(k for k in self._adapters if k not in needed)  # exists: batches hold ≤ max_adapters
            delete_adapter(self.model, self._adapters[victim])
            with self._lock:
                del self._adapters[victim]

    def virtual_tokens(self, name: str) -> int:
        """Context positions an adapter takes before the prompt (prompt and prefix tuning)."""
        return 0 if name == BASE else getattr(adapter_state(self.model).configs[name], "num_virtual_tokens", 0)

    def batches(self, rows: list[_Row]) -> Iterator[tuple[list[str] | None, list[_Row]]]:
        """(adapter_names or None, rows) to decode together: one mixed batch for the base and the
        methods that mix, then one batch per adapter that cannot mix, run with it active."""
        configs = adapter_state(self.model).configs if self._adapters else {}
        mixable = [r for r in rows if r.adapter == BASE or spec_for(configs[r.adapter]).mixed_batch]
        if mixable:
            # With no adapter loaded there are no feathertune hooks to take adapter_names.
            yield ([r.adapter for r in mixable] if configs else None), mixable
        alone = [r for r in rows if r not in mixable]
        for name in dict.fromkeys(r.adapter for r in alone):
            set_active(self.model, [name])
            yield None, [r for r in alone if r.adapter == name]


@dataclass(eq=False)
class _Row:
    """One request inside a batch: its prompt, sampler, the tokens so far and the text they make."""

    job: _Job
    base: _Base
    adapter: str  # the name on the model, or BASE
    prompt: list[int]
    max_tokens: int
    generator: torch.Generator | None  # None: greedy
    ids: list[int] = field(default_factory=list)  # the completion's tokens, an ending eos left out
    sampled: int = 0
    text: str = ""
    streamed: str = ""  # the part of `text` already sent to a streaming caller
    finish_reason: str | None = None

    @classmethod
    def prepare(cls, base: _Base, job: _Job, adapter: str) -> _Row:
        """Render and tokenize the conversation and fix the token budget.

        Raises:
            ConfigError: no chat template, messages the template refuses, or no room in the context.
        """
        request, tokenizer = job.request, base.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"the tokenizer of {base.name!r} has no chat template, so it cannot chat; "
                              f"use an instruct/chat model", source="chat completion request")
        try:
            text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError, ValueError...: the messages do not fit the template
            raise ConfigError(f"the chat template of {base.name!r} refused the messages: {exc}",
                              source="messages") from exc
        # The template holds any BOS already, so the tokenizer must not add a second.
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = _token_budget(base, request, len(prompt), base.virtual_tokens(adapter))
        return cls(job, base, adapter, prompt, max_tokens, _generator(request, base.device))

    def push(self, token: int) -> bool:
        """Add one sampled token; True once the row is finished (or its caller has gone)."""
        self.sampled += 1
        stops = self.job.request.stop
        if token in self.base.eos:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            if stops or self.job.streaming:  # else the text is only needed at the end
                self.text = self.base.tokenizer.decode(self.ids, skip_special_tokens=True)
                cut = _first_stop(self.text, stops)
                if cut is not None:
                    self.text, self.finish_reason = self.text[:cut], "stop"
            if self.finish_reason is None and len(self.ids) >= self.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self._finish()
        elif self.job.streaming:
            self._send(len(self.text) - _held_back(self.text, stops))
        return self.finish_reason is not None or self.job.cancelled

    def _finish(self) -> None:
        if not (self.job.request.stop or self.job.streaming):
            self.text = self.base.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.job.streaming:
            self._send(len(self.text))
        self.job.finish(ChatResult(self.text, self.finish_reason, len(self.prompt), self.sampled))

    def _send(self, end: int) -> None:
        """Send the caller text[:end] beyond what it has. Skipped if the decoded text changed
        characters already sent (an unusual tokenizer); the ChatResult's text is the reference."""
        # Decoding the whole id list (not token by token) gets multi-byte characters right.
        piece = self.text[:end]
        if len(piece) > len(self.streamed) and piece.startswith(self.streamed):
            self.job.events.put(piece[len(self.streamed):])
            self.streamed = piece


def _generator(request: ChatRequest, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (None for greedy): seeded, so that it samples the same text
    whatever shares its batch, or from fresh entropy."""
    if request.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator(device=device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed % 2**64)  # OpenAI takes any integer; torch 64 bits
    return generator


def _token_budget(base: _Base, request: ChatRequest, prompt_tokens: int, virtual: int) -> int:
    """max_tokens, checked against the room the context leaves after the prompt."""
    if base.context is None:
        return request.max_tokens or DEFAULT_MAX_TOKENS
    room = base.context - virtual - prompt_tokens
    used = f"{prompt_tokens} tokens" + (f" (and the adapter's {virtual} virtual tokens)" if virtual else "")
    if room < 1:
        raise ConfigError(f"the prompt has {used} but {base.name!r} has a context of {base.context} tokens, "
                          f"leaving no room for an answer; shorten the messages", source="messages")
    if request.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if request.max_tokens > room:
        raise ConfigError(f"max_tokens={request.max_tokens} but the prompt has {used} and {base.name!r} has a "
                          f"context of {base.context} tokens, so at most {room} fit; lower max_tokens or "
                          f"shorten the messages", source="max_tokens")
    return request.max_tokens


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` not to stream yet: an unfinished multi-byte character
    (decoded as U+FFFD) or the start of a stop string, which the next tokens may complete."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        hold = max(hold, next((k for k in range(min(len(stop) - 1, len(text)), 0, -1)
                               if text.endswith(stop[:k])), 0))
    return hold


# --- decoding -------------------------------------------------------------------------------------

def decode(base: _Base, rows: list[_Row], adapter_names: list[str] | None) -> int:
    """Decode `rows` together, token by token with the KV cache, until every one has finished.

    Args:
        adapter_names: one per row for a mixed batch, or None to run the model's active adapters.

    Returns:
        The number of forward passes run.
    """
    from transformers import DynamicCache

    model = base.model
    inputs = _prefill_inputs([row.prompt for row in rows], base.pad_id, base.device)
    cache = DynamicCache(config=model.config)
    live = list(range(len(rows)))  # the rows still decoding, in the order of the batch
    forwards = 0
    while True:
        forwards += 1
        extra = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in live]}
        out = model(**inputs, **{base.cache_key: cache}, use_cache=True, **base.last_logits, **extra)
        logits = out.logits[:, -1].float()  # (b, V): the next token of each live row
        tokens = next_tokens(logits, [rows[i] for i in live])
        keep = [j for j, (i, token) in enumerate(zip(live, tokens)) if not rows[i].push(token)]
        if not keep:
            return forwards
        if len(keep) < len(live):  # finished rows leave the batch, and their keys and values the cache
            index = torch.tensor(keep, device=base.device)
            cache.batch_select_indices(index)
            inputs = {k: v[index] for k, v in inputs.items()}
            live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
        inputs = _step_inputs(inputs, tokens, base.device)


def _prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, their mask, and positions that start at 0 on each row's first real token.

    Without explicit position ids the model numbers the padding too. Rotary attention sees only
    position differences, so a plain Llama hardly notices, but learned absolute positions (GPT-2)
    and prompt tuning's virtual tokens at 0…n-1 do: a padded row's answer would differ from its
    answer alone. HF `generate` computes the same positions (`_prepare_position_ids_for_generation`).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T), 1 on real tokens
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T); the pads' value is never attended
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def _step_inputs(inputs: dict[str, torch.Tensor], tokens: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The next decode step's inputs: one new token per row, the mask one longer, positions + 1."""
    mask = inputs["attention_mask"]  # (b, T + steps)
    return {"input_ids": torch.tensor(tokens, dtype=torch.long, device=device)[:, None],  # (b, 1)
            "attention_mask": torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1),
            "position_ids": inputs["position_ids"][:, -1:] + 1}  # (b, 1)


def next_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Each row's next token from its logits (b, V): argmax for greedy rows, else a sample."""
    greedy = logits.argmax(dim=-1).tolist()  # one device sync for every greedy row
    return [greedy[j] if row.generator is None else
            sample(logits[j], row.job.request.temperature, row.job.request.top_p, row.generator)
            for j, row in enumerate(rows)]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token from softmax(logits / temperature), restricted to the top_p nucleus (Holtzman et al.
    2020: the smallest set of most likely tokens whose probabilities add up to at least top_p).

    logits: (V,). The generator, one per request, makes a seeded request reproducible whatever
    else shares its batch.
    """
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # A token stays if the tokens more likely than it hold less than top_p; the most likely one
        # always stays, however small top_p is (or rounds to, in float32).
        cut = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        cut[0] = False
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))  # multinomial renormalises
