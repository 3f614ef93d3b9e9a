"""The chat engine under `feathertune serve` (service/chat.py), on a tiny chat Llama.

- each adapter's greedy answer equals HF `generate` on a model holding only that adapter;
- 32 requests from 32 threads, over four LoRA adapters and the base, get batched (mean batch > 1)
  and each equals its answer alone; prompt and prefix tuning (they cannot share a mixed batch) too;
- adapters are evicted least recently used (or forgotten), the base is loaded once, an evicted one
  reloads exactly;
- stop strings, max_tokens, usage counts, seeded sampling, top_p, streaming, and bad requests.

The tiny model's weights are sharpened (std 0.3) so that answers depend on the prompt and the
adapter, and ties between logits are rare: otherwise a batching bug could go unnoticed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

import feathertune as ft
from feathertune.errors import ConfigError
from feathertune.evaluate import eos_ids
from feathertune.service.chat import ChatEngine, ChatRequest, ChatResult
from models import randomise, tiny_chat_model_dir

transformers = pytest.importorskip("transformers")

BASE = "tiny"
MAX = 10  # tokens per answer: enough to tell answers apart, few enough to keep the file fast
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello there, how are you today?",
          "a small model answers in a few words", "système, naïve café: ünïcödé text", "one two three four"] * 20
PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you today, my friend?"}],
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps"},
     {"role": "user", "content": "over what?"}],
    [{"role": "user", "content": "one two three four five six seven eight nine ten"}],
]
LORAS = ["lora0", "lora1", "lora2", "lora3"]
UNMIXABLE = ["prompt", "prefix"]  # prompt and prefix tuning: a batch of their own
EVERY = [None, *LORAS, *UNMIXABLE]  # None: the base model


# --- the model, the adapters and the references ---------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices gain nothing from threads, and on a busy two-core machine OpenMP's
    waiting threads slow every op down (measured: 2 s a request instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory)


def make_adapter(model_dir, out, config, seed: int):
    """An adapter with random, non-zero weights (a freshly attached LoRA adds nothing)."""
    model, _ = load(model_dir)
    ft.attach(model, config, name="x")
    randomise(model, seed)
    return ft.save_adapter(model, out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir = tiny_chat_model_dir(root / "model", CORPUS)
    model, _ = load(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
    model.save_pretrained(model_dir)
    adapters = {name: make_adapter(model_dir, root / name, ft.LoraConfig(
        r=4, alpha=8, dropout=0.0, target_modules="all-linear" if i % 2 else ["q_proj", "v_proj"]), seed=i)
        for i, name in enumerate(LORAS)}
    adapters["prompt"] = make_adapter(model_dir, root / "prompt", ft.PromptTuningConfig(num_virtual_tokens=4), seed=9)
    adapters["prefix"] = make_adapter(model_dir, root / "prefix", ft.PrefixTuningConfig(num_virtual_tokens=3), seed=9)
    return model_dir, adapters


def request(setup, adapter: str | None, messages, **settings) -> ChatRequest:
    _, adapters = setup
    return ChatRequest(base=BASE, adapter=adapters[adapter] if adapter else None,
                       adapter_key=f"ft:{BASE}:{adapter}:ftjob-1" if adapter else BASE,
                       messages=messages, **{"max_tokens": MAX, "temperature": 0.0, **settings})


def hf_answer(model, tokenizer, messages, max_new_tokens: int = MAX) -> str:
    """The independent reference: HF generate, greedy, batch of one; the text ends before the eos
    (which HF keeps in its output, and which need not be a special token)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    eos = eos_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    ends = [k for k, token in enumerate(new) if token in eos]
    return tokenizer.decode(new[:ends[0]] if ends else new, skip_special_tokens=True)


class CountingLoader:
    def __init__(self, model_dir):
        self.model_dir, self.calls = model_dir, 0

    def __call__(self, name):
        assert name == BASE, name
        self.calls += 1
        return load(self.model_dir)


@pytest.fixture(scope="module")
def engine(setup):
    engine = ChatEngine(CountingLoader(setup[0]), max_adapters=8, max_batch=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def alone(setup, engine):
    """Every (adapter, prompt)'s greedy result, each request run by itself."""
    return {(adapter, i): engine.complete(request(setup, adapter, messages))
            for adapter in EVERY for i, messages in enumerate(PROMPTS)}


# --- answers --------------------------------------------------------------------------------------

def test_adapters_change_the_answers(alone):
    """Otherwise every comparison below could pass with the adapters ignored."""
    for i in range(len(PROMPTS)):
        texts = [alone[adapter, i].text for adapter in EVERY]
        assert len(set(texts)) == len(texts), texts
    assert len({alone[None, i].text for i in range(len(PROMPTS))}) == len(PROMPTS)


@pytest.mark.parametrize("adapter", EVERY)
def test_greedy_answer_alone_equals_hf_generate(setup, alone, adapter):
    model, tokenizer = load(setup[0])
    if adapter is not None:
        ft.load_adapter(model, setup[1][adapter])
    for i, messages in enumerate(PROMPTS):
        assert alone[adapter, i].text == hf_answer(model, tokenizer, messages), (adapter, i)


def run_concurrently(engine, requests):
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(engine.complete, requests))


def test_concurrent_requests_are_batched_and_equal_their_answers_alone(setup, engine, alone):
    cases = [(([None, *LORAS])[k % 5], k % len(PROMPTS)) for k in range(32)]
    requests = [request(setup, adapter, PROMPTS[i]) for adapter, i in cases]

    started = time.perf_counter()
    one_by_one = [engine.complete(r) for r in requests]
    sequential_s = time.perf_counter() - started
    before = replace(engine.stats)
    started = time.perf_counter()
    together = run_concurrently(engine, requests)
    concurrent_s = time.perf_counter() - started

    for (adapter, i), first, second in zip(cases, one_by_one, together):
        assert first == alone[adapter, i] and second == alone[adapter, i], (adapter, i)
    batches, rows = engine.stats.batches - before.batches, engine.stats.rows - before.rows
    speed = (f"one at a time {len(requests) / sequential_s:.1f} req/s, concurrent "
             f"{len(requests) / concurrent_s:.1f} req/s ({sequential_s / concurrent_s:.1f}x), "
             f"{rows} rows in {batches} batches")
    print(f"\n[chat engine] {speed}")
    assert rows == len(requests) and rows / batches > 1, speed


def test_adapters_that_cannot_mix_run_beside_the_mixed_batch(setup, engine, alone):
    cases = [([*EVERY, *UNMIXABLE][k % 9], k % len(PROMPTS)) for k in range(36)]
    results = run_concurrently(engine, [request(setup, adapter, PROMPTS[i]) for adapter, i in cases])
    for (adapter, i), result in zip(cases, results):
        assert result == alone[adapter, i], (adapter, i)


def test_adapters_are_evicted_least_recently_used_and_reload_exactly(setup, alone):
    loader = CountingLoader(setup[0])
    engine = ChatEngine(loader, max_adapters=2, batch_window_s=0.0)
    try:
        for adapter in LORAS[:3]:
            assert engine.complete(request(setup, adapter, PROMPTS[1])) == alone[adapter, 1]
        keys = [request(setup, a, PROMPTS[1]).adapter_key for a in LORAS[:3]]
        assert engine.loaded() == {BASE: keys[1:]}
        assert engine.complete(request(setup, LORAS[0], PROMPTS[1])) == alone[LORAS[0], 1]
        assert engine.loaded() == {BASE: [keys[2], keys[0]]}
        # Three adapters at once with room for two: a batch takes two at most, every request is served.
        results = run_concurrently(engine, [request(setup, a, PROMPTS[2]) for a in LORAS[:3]])
        assert results == [alone[a, 2] for a in LORAS[:3]]
        assert len(engine.loaded()[BASE]) == 2 and loader.calls == 1
        # A deleted model's adapter is unloaded by the worker, soon; asked for again, it reloads.
        gone = engine.loaded()[BASE][0]
        engine.forget(gone)
        deadline = time.monotonic() + 5
        while gone in engine.loaded()[BASE] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone not in engine.loaded()[BASE] and len(engine.loaded()[BASE]) == 1
        adapter = LORAS[keys.index(gone)]
        assert engine.complete(request(setup, adapter, PROMPTS[1])) == alone[adapter, 1]
        assert gone in engine.loaded()[BASE] and loader.calls == 1
    finally:
        engine.close()


# --- settings and usage ---------------------------------------------------------------------------

def test_usage_counts_the_prompt_and_the_completion(setup, engine, alone):
    tokenizer = load(setup[0])[1]
    for i, messages in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        result = alone[None, i]
        assert result.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert result.finish_reason in ("stop", "length") and 1 <= result.completion_tokens <= MAX
        assert result.finish_reason == "stop" or result.completion_tokens == MAX


def test_an_eos_of_the_generation_config_ends_the_answer(setup, alone):
    """The tiny model never says <|im_end|>: make its third token an eos, as a chat model's
    generation_config lists end-of-turn tokens besides the tokenizer's eos."""
    model, tokenizer = load(setup[0])
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    third = int(model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, -1])
    eos = [tokenizer.eos_token_id, third]

    def load_with_eos(name):
        model, tokenizer = load(setup[0])
        model.generation_config.eos_token_id = eos
        return model, tokenizer

    engine = ChatEngine(load_with_eos, batch_window_s=0.0)
    try:
        result = engine.complete(request(setup, None, PROMPTS[0]))
    finally:
        engine.close()
    model.generation_config.eos_token_id = eos
    assert result.finish_reason == "stop" and result.completion_tokens == 3  # the eos counts
    assert result.text == hf_answer(model, tokenizer, PROMPTS[0]) and alone[None, 0].text.startswith(result.text)


def a_long_answer(alone):
    """An (adapter, prompt) whose answer runs to MAX tokens, with text to cut."""
    return next(key for key, r in alone.items() if r.finish_reason == "length" and len(r.text) >= 8)


def test_max_tokens_ends_with_length(setup, engine, alone):
    adapter, i = a_long_answer(alone)
    result = engine.complete(request(setup, adapter, PROMPTS[i], max_tokens=4))
    assert result.finish_reason == "length" and result.completion_tokens == 4
    assert alone[adapter, i].text.startswith(result.text)


def test_stop_string_cuts_the_text_before_it(setup, engine, alone):
    adapter, i = a_long_answer(alone)
    full = alone[adapter, i].text
    stop = full[3:6]
    result = engine.complete(request(setup, adapter, PROMPTS[i], stop=["zzzz", stop]))
    assert result.finish_reason == "stop"
    assert result.text == full[:full.find(stop)]
    assert result.completion_tokens < MAX  # decoding stopped there too


def test_streaming_deltas_join_to_the_completion(setup, engine, alone):
    keys = list(alone)
    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        streams = list(pool.map(lambda key: list(engine.stream(request(setup, key[0], PROMPTS[key[1]]))), keys))
    for key, events in zip(keys, streams):
        deltas, result = events[:-1], events[-1]
        assert isinstance(result, ChatResult) and result == alone[key], key
        assert all(isinstance(d, str) and d for d in deltas), key
        assert "".join(deltas) == result.text, key  # multi-byte characters (U+FFFD while unfinished) too
    adapter, i = a_long_answer(alone)
    stop = [alone[adapter, i].text[4:7]]
    events = list(engine.stream(request(setup, adapter, PROMPTS[i], stop=stop)))
    assert "".join(events[:-1]) == events[-1].text == engine.complete(request(setup, adapter, PROMPTS[i], stop=stop)).text
    assert events[-1].finish_reason == "stop" and len(events) > 2
    # A caller that stops listening (a client gone) leaves the engine serving the others.
    events = engine.stream(request(setup, adapter, PROMPTS[i], max_tokens=None))
    assert isinstance(next(events), str)
    events.close()
    assert engine.complete(request(setup, adapter, PROMPTS[i])) == alone[adapter, i]


def test_seeded_sampling_is_reproducible_even_in_a_batch(setup, engine):
    sampled = request(setup, LORAS[1], PROMPTS[1], temperature=1.0, seed=7)
    first = engine.complete(sampled)
    # The same request among others in a batch: its own generator gives it the same tokens.
    batch = [sampled, request(setup, None, PROMPTS[0]), sampled, request(setup, LORAS[2], PROMPTS[3])]
    results = run_concurrently(engine, batch)
    assert results[0] == first and results[2] == first
    others = {engine.complete(replace(sampled, seed=s)).text for s in range(8, 13)}
    assert len(others | {first.text}) > 1, "different seeds should sample different texts"


def test_a_tiny_top_p_keeps_only_the_most_likely_token(setup, engine, alone):
    result = engine.complete(request(setup, LORAS[0], PROMPTS[2], temperature=1.0, top_p=1e-6))
    assert result == alone[LORAS[0], 2]


# --- errors ---------------------------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_a_config_error(setup, engine):
    long = [{"role": "user", "content": "xq zv " * 400}]  # > 512 tokens: the context
    with pytest.raises(ConfigError, match="context of 512 tokens"):
        engine.complete(request(setup, None, long, max_tokens=None))
    with pytest.raises(ConfigError, match="context"):
        next(engine.stream(request(setup, LORAS[0], long)))
    with pytest.raises(ConfigError, match="max_tokens=600"):
        engine.complete(request(setup, None, PROMPTS[0], max_tokens=600))


def test_bad_settings_and_a_missing_adapter(setup, engine, tmp_path):
    with pytest.raises(ConfigError) as info:
        engine.complete(request(setup, None, PROMPTS[0], temperature=-1, top_p=0, stop=[""], max_tokens=0))
    assert len(info.value.problems) == 4, info.value.problems
    missing = replace(request(setup, None, PROMPTS[0]), adapter=tmp_path / "nope", adapter_key="ft:nope")
    with pytest.raises(FileNotFoundError):
        engine.complete(missing)
    assert engine.complete(request(setup, None, PROMPTS[0])).text  # the engine still serves


def test_a_closed_engine_refuses_requests(setup):
    engine = ChatEngine(CountingLoader(setup[0]))
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.complete(request(setup, None, PROMPTS[0]))
