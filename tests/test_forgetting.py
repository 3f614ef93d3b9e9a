"""Forgetting: the rise of the loss on general text over the base's (causal LMs), or the drift of the
representations of it (encoders), for every method; the shipped WikiText sample and the script that
builds it; `feathertune eval --forgetting`.

The losses are checked against a reference written here: each text alone (no padding, no batching),
through a float64 copy of the model, log_softmax and gather.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_llama
from runs import REPO, make_workspace
from test_contract import METHODS

import feathertune as ft
from feathertune import evaluate
from feathertune.adapters import adapter_parameters
from feathertune.cli import main as cli
from feathertune.errors import ConfigError, DataError
from feathertune.registry import METHODS as REGISTRY

MAX_LENGTH = 24  # the tiny models have 64 positions, virtual tokens included
LENGTHS = (5, 17, 3, 30, 11, 24)  # uneven, so batches pad; 30 is cut to MAX_LENGTH
TEXTS = [" ".join(f"w{(5 * n + 3 * k) % (VOCAB - 8)}" for k in range(length)) for n, length in enumerate(LENGTHS)]
LLAMA_METHODS = [name for name, (_, _, kinds) in METHODS.items() if "llama" in kinds]
ZERO_INIT = [name for name in LLAMA_METHODS if METHODS[name][1]]


def word_tokenizer():
    """An offline word-level tokenizer over the tiny models' vocabulary: "w17" is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


_TRAINED: list = []


def trained_llama():
    """tiny_llama after 15 Adam steps on TEXTS' rule (each next word is the last one + 3): a base that
    knows the texts (0.75 nats a token; chance is ln 96 = 4.56), so that a random change makes it worse."""
    if not _TRAINED:
        torch.manual_seed(0)
        model, tokenizer = tiny_llama(), word_tokenizer()
        lines = [" ".join(f"w{(8 * n + 3 * k) % (VOCAB - 8)}" for k in range(MAX_LENGTH)) for n in range(11)]
        batch = {"input_ids": torch.tensor(tokenizer(lines)["input_ids"])}  # every word, and the word 3 on
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(15):
            optimizer.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
        _TRAINED.append(model.eval())
    return copy.deepcopy(_TRAINED[0])


def with_method(model, method: str, kind: str = "llama"):
    name, values = METHODS[method][0](kind)
    return ft.attach(model, REGISTRY[name].config_class(**values))


@torch.no_grad()
def perturbed(model, seed: int = 0, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, "default"):
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@torch.no_grad()
def reference_loss(model, tokenizer, texts) -> float:
    """Mean next-token loss, each text alone through a float64 copy: log_softmax + gather."""
    model64 = copy.deepcopy(model).double().eval()
    total, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:MAX_LENGTH]])  # (1, T)
        logp = torch.log_softmax(model64(input_ids=ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
        tokens += ids.shape[1] - 1
    return total / tokens


def reference_forgetting(model, tokenizer, texts) -> float:
    with ft.disabled(model):
        base = reference_loss(model, tokenizer, texts)
    return reference_loss(model, tokenizer, texts) - base


# --- causal LMs: the loss ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ZERO_INIT)
def test_a_zero_initialised_adapter_forgets_nothing(method):
    model = with_method(trained_llama(), method)
    found = evaluate.forgetting(model, word_tokenizer(), TEXTS, max_length=MAX_LENGTH)
    assert abs(found["forgetting"]) < 1e-6 and abs(found["forgetting_pct"]) < 1e-4, found
    assert found["measure"] == "loss" and found["general_texts"] == len(TEXTS)
    assert found["general_tokens"] == sum(min(n, MAX_LENGTH) - 1 for n in LENGTHS)


@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_forgetting_equals_a_float64_reference_for_every_method(method):
    tokenizer = word_tokenizer()
    model = perturbed(with_method(trained_llama(), method))
    found = evaluate.forgetting(model, tokenizer, TEXTS, batch_size=4, max_length=MAX_LENGTH)
    expected = reference_forgetting(model, tokenizer, TEXTS)
    assert found["base_general_loss"] < 1, found
    if method in ("prompt_tuning", "llama_adapter"):  # learned tokens to attend to may help as well as hurt
        assert abs(found["forgetting"]) > 1e-4, found
    else:
        assert found["forgetting"] > 1e-4, found
    assert found["forgetting"] == pytest.approx(expected, abs=2e-5), (found, expected)
    assert found["forgetting"] == pytest.approx(found["general_loss"] - found["base_general_loss"], abs=1e-12)
    assert found["forgetting_pct"] == pytest.approx(100 * (found["general_loss"] / found["base_general_loss"] - 1))


def test_the_model_is_left_as_found():
    model = perturbed(with_method(tiny_llama(), "lora"))
    ft.merge(model, unload=False)
    model.train()
    model.model.layers[0].eval()  # a deliberately frozen part stays frozen
    flags = [m.training for m in model.modules()]
    ids = torch.tensor([[3, 5, 7, 9]])
    before = model(input_ids=ids).logits.detach()
    evaluate.forgetting(model, word_tokenizer(), TEXTS, max_length=MAX_LENGTH)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model(input_ids=ids).logits.detach(), before), "merged adapters stay merged and active"


def test_a_model_without_adapters_is_compared_with_the_base_it_is_given():
    tokenizer = word_tokenizer()
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=1)  # seed 1 stands in for a full fine-tune of seed 0
    with pytest.raises(ConfigError, match="pass base=<the original model>"):
        evaluate.forgetting(tuned, tokenizer, TEXTS, max_length=MAX_LENGTH)
    found = evaluate.forgetting(tuned, tokenizer, TEXTS, base=base, max_length=MAX_LENGTH)
    expected = reference_loss(tuned, tokenizer, TEXTS) - reference_loss(base, tokenizer, TEXTS)
    assert found["forgetting"] == pytest.approx(expected, abs=2e-5)
    loss, tokens = evaluate.general_text_loss(base, tokenizer, TEXTS, max_length=MAX_LENGTH)
    assert loss == pytest.approx(found["base_general_loss"], abs=1e-12) and tokens == found["general_tokens"]
    scored_once = evaluate.general_score(base, tokenizer, TEXTS, max_length=MAX_LENGTH)
    assert evaluate.forgetting(tuned, tokenizer, TEXTS, base=scored_once, max_length=MAX_LENGTH) == found


def test_bad_texts_and_files_are_named():
    tokenizer = word_tokenizer()
    model = with_method(tiny_llama(), "lora")
    with pytest.raises(ConfigError, match=r"texts\[1\] is blank"):
        evaluate.forgetting(model, tokenizer, ["w1 w2", "  "])
    with pytest.raises(ConfigError, match="non-empty list"):
        evaluate.forgetting(model, tokenizer, [])
    with pytest.raises(DataError, match="nowhere.txt"):
        evaluate.general_text("nowhere.txt")
    with pytest.raises(ConfigError, match="is not a causal LM"):
        evaluate.general_text_loss(tiny_bert(), tokenizer, TEXTS)
    with pytest.raises(ConfigError, match="compare a causal LM with a causal LM"):
        evaluate.forgetting(model, tokenizer, TEXTS, base=evaluate.general_score(tiny_bert(), tokenizer, TEXTS))


# --- encoders: the drift -------------------------------------------------------------------------

@torch.no_grad()
def reference_states(model, tokenizer, texts) -> torch.Tensor:
    """Each text alone, the mean over its tokens of BERT's last layer as `output_hidden_states` gives it."""
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:MAX_LENGTH]])
        rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double().mean(0))
    return torch.stack(rows)


def test_drift_of_a_bert_classifier_is_0_disabled_and_positive_perturbed():
    tokenizer = word_tokenizer()
    model = with_method(tiny_bert(), "lora", "bert")

    def drift() -> float:
        return evaluate.forgetting(model, tokenizer, TEXTS, max_length=MAX_LENGTH)["forgetting"]

    assert drift() == pytest.approx(0, abs=1e-12)
    perturbed(model)
    found = evaluate.forgetting(model, tokenizer, TEXTS, max_length=MAX_LENGTH)
    assert found["measure"] == "drift" and found["general_loss"] is None and found["base_general_loss"] is None
    assert found["general_tokens"] == sum(min(n, MAX_LENGTH) for n in LENGTHS)
    states, _ = evaluate.mean_pooled_states(model, tokenizer, TEXTS, batch_size=4, max_length=MAX_LENGTH)
    assert torch.allclose(states, reference_states(model, tokenizer, TEXTS), atol=1e-5)
    with ft.disabled(model):
        base_states = reference_states(model, tokenizer, TEXTS)
        assert drift() == pytest.approx(0, abs=1e-12)
        assert torch.equal(reference_states(model, tokenizer, TEXTS), base_states), "the caller's block stays disabled"
    cosine = torch.nn.functional.cosine_similarity(reference_states(model, tokenizer, TEXTS), base_states, dim=-1)
    assert found["forgetting"] > 1e-4
    assert found["forgetting"] == pytest.approx(float((1 - cosine).mean()), abs=1e-5)
    assert found["forgetting_pct"] == pytest.approx(100 * found["forgetting"])


@pytest.mark.parametrize("method", ["prompt_tuning", "loreft", "ia3", "bitfit"])
def test_drift_runs_for_methods_that_lengthen_or_edit_the_sequence(method):
    """Prompt tuning puts 4 virtual tokens in front: only the text's own positions are pooled (the
    reference reads them from `hidden_states`, which prompt tuning cuts to the text's)."""
    tokenizer = word_tokenizer()
    model = perturbed(with_method(tiny_bert(), method, "bert"))
    found = evaluate.forgetting(model, tokenizer, TEXTS, max_length=MAX_LENGTH)
    assert 0 < found["forgetting"] < 2 and math.isfinite(found["forgetting_pct"]), found
    if method == "prompt_tuning":
        states, _ = evaluate.mean_pooled_states(model, tokenizer, TEXTS, max_length=MAX_LENGTH)
        assert torch.allclose(states, reference_states(model, tokenizer, TEXTS), atol=1e-5)


# --- the shipped sample and its script -----------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("make_general_text", REPO / "scripts" / "make_general_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_sample_is_clean_prose_with_its_license():
    text = evaluate.GENERAL_TEXT.read_text(encoding="utf-8")
    paragraphs = evaluate.general_text()
    assert len(paragraphs) >= 50 and text == "".join(p + "\n" for p in paragraphs)
    for marker in ("<unk>", " @-@ ", " @,@ ", " @.@ ", " ,", " .", " 's", "( ", " )", ' " '):
        assert marker not in text, marker
    assert all(40 <= len(p.split()) <= 200 and p.count('"') % 2 == 0 for p in paragraphs)
    readme = (REPO / "data" / "README.md").read_text()
    section = readme[readme.index("## general/"):]
    assert "CC BY-SA 3.0" in section and "arXiv:1609.07843" in section and "--forgetting" in section


def test_the_script_detokenizes_wikitext():
    script = load_script()
    line = (' The 1 @,@ 000 @-@ ton ship ( built in 1890 ) was n\'t " the best " , said Hill \'s crew : '
            '" it worked . " In 2000 – 2005 , at 21 : 00 , it cost $ 5 @.@ 2 million — 10 % more . ')
    assert script.detokenize(line) == ('The 1,000-ton ship (built in 1890) wasn\'t "the best", said Hill\'s crew: '
                                       '"it worked." In 2000–2005, at 21:00, it cost $5.2 million—10% more.')
    lines = [" = Title = ", " = = Section = = ", " " + "word " * 45, " " + "word " * 10, " <unk> " + "word " * 45,
             " the ships ' hulls " + "word " * 45, ' one " quote ' + "word " * 45]
    assert script.paragraphs(lines) == [" ".join(["word"] * 45)]


def test_the_script_rebuilds_the_shipped_sample_byte_for_byte(tmp_path):
    script = load_script()
    sources = [path for path, _ in script.SOURCES.values()]
    if not all(path.is_file() for path in sources):
        pytest.skip(f"WikiText-2's test and validation splits are not at {', '.join(map(str, sources))}; "
                    f"the script's docstring says where to download them")
    out = tmp_path / "wikitext.txt"
    assert script.main([*map(str, sources), "--out", str(out)]) == 0
    assert out.read_bytes() == evaluate.GENERAL_TEXT.read_bytes()


# --- feathertune eval --forgetting ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root, config = make_workspace(tmp_path_factory.mktemp("forgetting"))
    out = root / "runs" / "lora"
    values = {**config, "train": {**config["train"], "max_steps": 2, "checkpoint_every": 0},
              "eval": {"compare_base": False, "max_new_tokens": 4, "batch_size": 4, "samples": 0}}
    ft.run(ft.TrainConfig.from_dict({**values, "output": str(out)}), log=lambda *_: None)
    general = root / "general.txt"
    general.write_text("".join(line + "\n" for line in evaluate.general_text()[:6]))
    return root, config, out, general


def test_cli_eval_reports_forgetting_on_the_shipped_text(lora_run, capsys):
    root, config, run, _ = lora_run
    capsys.readouterr()
    assert cli(["eval", str(run), "--forgetting"]) == 0
    shown = json.loads(capsys.readouterr().out)["forgetting"]
    assert shown["measure"] == "loss" and shown["general_texts"] == len(evaluate.general_text())
    assert shown["general_tokens"] > 1000 and shown["base_general_loss"] > 0
    model, tokenizer = ft.load_model(config["model"])
    ft.load_adapter(model, run / "adapter")
    assert shown == evaluate.forgetting(model, tokenizer, batch_size=4)


def test_cli_eval_gives_each_alpha_its_forgetting_against_alpha_0(lora_run, capsys):
    root, _, run, general = lora_run
    capsys.readouterr()
    assert cli(["eval", str(run), "--general", str(general)]) == 0
    plain = json.loads(capsys.readouterr().out)["forgetting"]
    assert plain["general_texts"] == 6
    assert cli(["eval", str(run), "--alpha", "0,1", "--general", str(general)]) == 0
    points = json.loads(capsys.readouterr().out)["interpolation"]
    assert points[0]["forgetting"]["forgetting"] == pytest.approx(0, abs=1e-6)
    assert points[0]["forgetting"]["base_general_loss"] == pytest.approx(plain["base_general_loss"], abs=1e-5)
    assert points[1]["forgetting"]["forgetting"] == pytest.approx(plain["forgetting"], abs=1e-5)


def test_cli_eval_forgetting_needs_a_fine_tune_and_an_existing_file(lora_run, capsys):
    root, config, run, _ = lora_run
    assert cli(["eval", config["model"], "--data", str(root / "validation.jsonl"), "--forgetting"]) == 2
    assert "is a base model alone" in capsys.readouterr().err
    assert cli(["eval", str(run), "--general", str(root / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
