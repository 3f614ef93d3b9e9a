"""A new user's path one step past the demo, through the `feathertune` command as they would type it.

Each test here once failed against a real defect (issue 7): resume that took a changed config,
checks that ran only after training, merge and generate that ignored a run's task, chat scores
that read 0.0 for right answers, hub retries for a typo, paths that followed the current
directory instead of the config file, method names that were refused, adapters that PEFT could not
load offline, `eval` that could not score a base model, and a handful of inconsistencies.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import torch
import yaml
from runs import REPO, adapter_tensors, make_workspace, metric_steps, sst2_slice, train_until_killed, write_config

import feathertune as ft
from feathertune.cli import main as cli

QUIET = {"eval": {"compare_base": False, "max_new_tokens": 4, "batch_size": 4, "samples": 1}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root, config = make_workspace(tmp_path_factory.mktemp("cli"))
    sst2_slice(root)
    return root, config


def classification_config(root: Path, model: str = "minilm-l6") -> dict:
    return {"model": model, "task": "classification",
            "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "data": {"train": str(root / "sst-train.tsv"), "validation": str(root / "sst-dev.tsv"),
                     "max_length": 32},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 0},
            "eval": {"batch_size": 32}}


def short(config: dict, steps: int = 1) -> dict:
    """The workspace config cut to `steps` steps, no checkpoints and no base comparison: a quick run."""
    return {**config, "train": {**config["train"], "max_steps": steps, "checkpoint_every": 0}, **QUIET}


# --- 1. resume: the run directory owns its config ---------------------------------------------------

@pytest.fixture(scope="module")
def killed_run(workspace):
    """A run started with command-line overrides and killed after its second checkpoint (step 4 of 6),
    and the unbroken run it should end up equal to."""
    root, config = workspace
    cfg = write_config(root, config, "resume-base", train={"max_steps": 3, "checkpoint_every": 5})
    overrides = ["train.max_steps=6", "train.checkpoint_every=2"]
    reference = root / "runs" / "resume-reference"
    assert cli(["train", str(cfg), *overrides, f"output={reference}"]) == 0
    return cfg, overrides, reference


def killed_again(workspace, killed_run, name: str) -> Path:
    """runs/NAME: the killed run of `killed_run` once more, for one test to resume as it likes."""
    root, _ = workspace
    cfg, overrides, _ = killed_run
    out = root / "runs" / name
    killed = train_until_killed([str(cfg), *overrides, f"output={out}"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    return out


def test_resume_with_only_the_output_finishes_exactly_like_the_unbroken_run(workspace, killed_run, capsys):
    reference = killed_run[2]
    out = killed_again(workspace, killed_run, "resume-bare")
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert cli(["train", "--resume", f"output={out}"]) == 0
    assert f"resuming from {out / 'checkpoints' / 'step-000004'} (step 4 of 6)" in capsys.readouterr().out
    ours, theirs = adapter_tensors(out), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "config.yaml").read_text() == saved  # nothing changed, nothing rewritten differently


def test_resume_with_a_config_that_differs_is_refused_listing_each_difference(workspace, killed_run, capsys):
    """The defect as seen: the same YAML without the overrides the run was started with."""
    cfg = killed_run[0]
    out = killed_again(workspace, killed_run, "resume-changed")
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert cli(["train", str(cfg), f"output={out}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "train.checkpoint_every" in err, err
    assert "6" in err and "3" in err and "Traceback" not in err
    assert cli(["train", "--resume", f"output={out}", "train.lr=0.01", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "0.005" in err and "0.01" in err and "adapter.r" in err, err
    assert (out / "config.yaml").read_text() == saved  # a refused resume writes nothing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_resume_may_extend_the_number_of_steps_and_says_so(workspace, killed_run, capsys):
    out = killed_again(workspace, killed_run, "resume-extended")
    capsys.readouterr()
    assert cli(["train", "--resume", f"output={out}", "train.max_steps=8", "eval.samples=0"]) == 0
    shown = capsys.readouterr().out
    assert "train.max_steps: 6 → 8" in shown, shown
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 8
    # Back before the newest checkpoint is not an extension.
    assert cli(["train", "--resume", f"output={out}", "train.max_steps=3"]) == 2
    assert "already finished" in capsys.readouterr().err


def test_resume_of_a_checkpoint_past_the_new_end_is_refused(workspace, killed_run, capsys):
    out = killed_again(workspace, killed_run, "resume-short")
    capsys.readouterr()
    assert cli(["train", "--resume", f"output={out}", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "train.max_steps=3" in err, err


# --- 2. every check before training; failures leave nothing behind ---------------------------------

def broken_cases(root: Path, config: dict) -> dict[str, tuple[dict, dict, str]]:
    """name -> (broken config, fixed config, words the error must hold)."""
    chat, classification = short(config), {**classification_config(root), **QUIET}
    tiny_classifier = {**classification_config(root, model=config["model"]), **QUIET}
    tiny_classifier["lora"] = {**tiny_classifier["lora"], "target_modules": ["q_proj", "v_proj"]}
    tiny_classifier["data"] = {**tiny_classifier["data"], "max_length": 256}
    bad_line = root / "bad-line.jsonl"
    bad_line.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]}\n')
    odd_label = root / "odd-label.tsv"
    odd_label.write_text("sentence\tlabel\nnice \t1\nodd \t2\n")
    return {
        "bad training line": ({**chat, "data": {**chat["data"], "train": str(bad_line)}}, chat, "asistant"),
        # A chat model as a classifier: its tokenizer renders the chat validation file too, so
        # only the check of kinds stops this before training (it used to crash after it).
        "validation of another kind": (
            {**tiny_classifier, "data": {**tiny_classifier["data"], "validation": str(root / "validation.jsonl")}},
            tiny_classifier, "chat"),
        "task that does not fit the data": ({**chat, "task": "classification"}, chat, "task"),
        "label outside the training labels": (
            {**classification, "data": {**classification["data"], "validation": str(odd_label)}},
            classification, "'2'"),
        "model that cannot do the task": ({**chat, "model": "minilm-l6"}, chat, "minilm-l6"),
        "unknown model name": ({**chat, "model": "no-such-model"}, chat, "no-such-model"),
        "unknown config key": ({**chat, "train": {**chat["train"], "batch": 4}}, chat, "train.batch_size"),
        "unknown method": ({**chat, "method": "lorax"}, chat, "lora"),
    }


CASES = ["bad training line", "validation of another kind", "task that does not fit the data",
         "label outside the training labels", "model that cannot do the task", "unknown model name",
         "unknown config key", "unknown method"]


@pytest.mark.parametrize("case", CASES)
def test_a_failed_pre_training_check_leaves_nothing_and_the_rerun_works(workspace, capsys, case):
    root, config = workspace
    broken, fixed, words = broken_cases(root, config)[case]
    out = root / "runs" / f"pre-{case.replace(' ', '-')}"
    name = case.replace(" ", "-")
    assert cli(["train", str(write_config(root, broken, f"broken-{name}")), f"output={out}"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not out.exists()
    assert cli(["train", str(write_config(root, fixed, f"fixed-{name}")), f"output={out}"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_train_and_validation_of_different_kinds_are_named_before_anything_loads(workspace, capsys):
    root, workspace_config = workspace
    config = classification_config(root, model=workspace_config["model"])
    config["lora"]["target_modules"] = ["q_proj", "v_proj"]
    config["data"].update(validation=str(root / "validation.jsonl"), max_length=256)
    assert cli(["train", str(write_config(root, config, "kinds")), f"output={root / 'runs' / 'kinds'}"]) == 2
    err = capsys.readouterr().err
    assert "sst-train.tsv" in err and "validation.jsonl" in err and "classification" in err, err


def test_a_run_that_dies_before_its_first_checkpoint_does_not_block_a_rerun(workspace, monkeypatch, capsys):
    from feathertune import loss

    root, config = workspace
    out = root / "runs" / "died-early"
    cfg = write_config(root, short(config, steps=2), "died-early")
    original = loss.loss_sum
    monkeypatch.setattr(loss, "loss_sum", lambda *a, **k: original(*a, **k) * float("nan"))
    assert cli(["train", str(cfg), f"output={out}"]) == 2
    assert "the loss is nan" in capsys.readouterr().err
    monkeypatch.setattr(loss, "loss_sum", original)
    assert cli(["train", str(cfg), f"output={out}"]) == 0
    assert metric_steps(out) == [1, 2]  # the failed attempt's records are gone


# --- 3. merge, generate and chat read the task from the run -----------------------------------------

@pytest.fixture(scope="module")
def classification_run(workspace):
    root, _ = workspace
    out = root / "runs" / "sst"
    assert cli(["train", str(write_config(root, classification_config(root), "sst")), f"output={out}"]) == 0
    return out


def test_merge_of_a_classification_run_gives_the_same_classifier(classification_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    merged_dir = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(classification_run), "--out", str(merged_dir)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert merged.config.id2label == {0: "0", 1: "1"}
    model, tokenizer = ft.load_model("minilm-l6", task="classification", label_names=["0", "1"])
    ft.load_adapter(model, classification_run / "adapter")
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (merged(**batch).logits - model(**batch).logits).abs().max() <= 1e-5


def test_generate_and_chat_refuse_a_classification_adapter_clearly(classification_run, capsys):
    for command in (["generate", "--adapter", str(classification_run), "hello"],
                    ["chat", "--adapter", str(classification_run)]):
        assert cli(command) == 2
        err = capsys.readouterr().err
        assert "classification" in err and "feathertune eval" in err and "Traceback" not in err, err


# --- 4. chat evaluation: exact match and chrF beside BLEU -------------------------------------------

def test_exact_match_and_chrf_see_short_right_answers_that_bleu_scores_zero():
    from feathertune import evaluate

    answers = ["Paris", "4", "blue", "yes", "Mars"]
    references = [["Paris"], ["4"], ["Blue."], ["no"], ["Jupiter"]]
    assert evaluate.bleu(answers, references) == 0.0  # no 4-gram in one-word answers
    assert evaluate.exact_match(answers, references) == pytest.approx(3 / 5)  # "blue" == "Blue." after normalising
    assert 0 < evaluate.chrf(answers, references) < 100
    assert evaluate.exact_match(["  the  answer "], [["x", "The answer"]]) == 1.0  # any reference counts


def test_chat_runs_report_exact_match_chrf_and_both_losses(workspace, capsys):
    root, config = workspace
    out = root / "runs" / "chat-scores"
    cfg = write_config(root, {**short(config, steps=2), "eval": {"max_new_tokens": 4, "samples": 2}}, "chat-scores")
    assert cli(["train", str(cfg), f"output={out}"]) == 0
    summary = capsys.readouterr().out
    scores = json.loads((out / "eval.json").read_text())
    for key in ("bleu", "base_bleu", "chrf", "base_chrf", "exact_match", "base_exact_match", "eval_loss",
                "base_eval_loss"):
        assert isinstance(scores[key], float), key
    assert "exact match" in summary and "chrF" in summary and "BLEU" in summary and "loss" in summary, summary
    assert cli(["eval", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"loss", "bleu", "chrf", "exact_match"} <= set(shown)


# --- 5. a typo in a model name costs no hub retries -------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Name lookups for anything but this machine fail, as they do offline; each attempt is counted."""
    attempts = []
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host in ("localhost", "127.0.0.1", "::1"):
            return real(host, *args, **kwargs)
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_a_typo_in_an_embedded_name_says_did_you_mean_without_asking_the_hub(no_network, capsys):
    assert cli(["generate", "--model", "smollm2-135m-instruc", "hello"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'smollm2-135m-instruct'" in err and "org/name" in err, err
    assert no_network == []


def test_a_hub_id_with_no_network_fails_at_once_without_retries(no_network, capsys):
    assert cli(["generate", "--model", "someone/some-model", "hello"]) == 2
    err = capsys.readouterr().err
    assert "someone/some-model" in err and "no network" in err and "HF cache" in err, err
    assert len(no_network) <= 1, no_network  # one reachability probe, then the local cache only


# --- 6. paths in a config resolve against the config file -------------------------------------------

def test_paths_in_a_config_follow_the_config_file_and_are_saved_absolute(workspace, tmp_path, monkeypatch, capsys):
    root, config = workspace
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (project / "data" / name).write_text((root / name).read_text())
    relative = {**short(config, steps=2), "model": os.path.relpath(root / "model", project / "configs"),
                "data": {**config["data"], "train": "../data/train.jsonl", "validation": "../data/validation.jsonl"},
                "output": "../runs/rel"}
    cfg = write_config(project / "configs", relative, "relative")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli(["train", str(cfg)]) == 0
    out = project / "runs" / "rel"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["train"] == str(project / "data" / "train.jsonl")
    assert saved["data"]["validation"] == str(project / "data" / "validation.jsonl")
    assert saved["model"] == str(root / "model") and saved["output"] == str(out)
    monkeypatch.chdir("/")
    capsys.readouterr()
    assert cli(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 4
    # A path given on the command line is relative to where it is typed.
    monkeypatch.chdir(project)
    assert cli(["train", str(cfg), "output=runs/typed", "eval.compare_base=false"]) == 0
    assert (project / "runs" / "typed" / "adapter").is_dir()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_names_files_that_exist_wherever_it_is_run_from(recipe, monkeypatch):
    monkeypatch.chdir("/")
    config = ft.load_config(REPO / "recipes" / recipe)
    assert Path(config.data.train).is_file() and Path(config.data.validation).is_file()
    assert Path(config.output).parent == REPO / "runs"


# --- 7. the method names people use ------------------------------------------------------------------

@pytest.mark.parametrize("method, key, value", [("dora", "use_dora", True), ("rslora", "use_rslora", True),
                                                ("pissa", "init_lora_weights", True)])
def test_lora_variants_are_methods(workspace, method, key, value):
    root, config = workspace
    out = root / "runs" / f"method-{method}"
    assert cli(["train", str(write_config(root, short(config), f"method-{method}", method=method)),
                f"output={out}"]) == 0
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written[key] is value
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == method
    if method == "pissa":
        assert saved["adapter"]["init"] == "pissa" and written["r"] == 2 * config["lora"]["r"]


def test_a_variant_that_contradicts_its_lora_section_is_refused(workspace, capsys):
    root, config = workspace
    conflicting = {**short(config), "method": "dora", "lora": {**config["lora"], "use_dora": False}}
    assert cli(["train", str(write_config(root, conflicting, "conflict")), f"output={root / 'runs' / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "method=dora" in err and "lora.use_dora" in err, err


def test_an_unknown_method_lists_the_accepted_ones(workspace, capsys):
    root, config = workspace
    assert cli(["train", str(write_config(root, short(config), "unknown", method="doora")),
                f"output={root / 'runs' / 'y'}"]) == 2
    err = capsys.readouterr().err
    assert "did you mean dora" in err and "rslora" in err and "qlora" in err, err
    from feathertune.registry import METHODS
    assert all(name in err for name in METHODS), err  # every registered method is offered


# --- 8. adapters that PEFT loads offline as written ---------------------------------------------------

def test_peft_loads_an_embedded_models_adapter_from_its_own_config(classification_run):
    from peft import AutoPeftModelForSequenceClassification

    written = json.loads((classification_run / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS"
    assert Path(written["base_model_name_or_path"], "config.json").is_file()  # a directory, not a name
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(classification_run / "adapter").eval()
    model, tokenizer = ft.load_model("minilm-l6", task="classification", label_names=["0", "1"])
    ft.load_adapter(model, classification_run / "adapter")
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (theirs(**batch).logits - model(**batch).logits).abs().max() <= 1e-5


def test_peft_loads_a_causal_adapter_from_its_own_config(workspace):
    from peft import AutoPeftModelForCausalLM

    root, config = workspace
    out = root / "runs" / "peft-causal"
    assert cli(["train", str(write_config(root, short(config), "peft-causal")), f"output={out}"]) == 0
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == "CAUSAL_LM"
    theirs = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    model, _ = ft.load_model(config["model"])
    ft.load_adapter(model, out / "adapter")
    ids = torch.tensor([[5, 9, 14, 20, 31]])
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids).logits).abs().max() <= 1e-5


# --- 9. eval scores a base model alone ---------------------------------------------------------------

def test_eval_scores_a_base_model_given_by_path_or_by_name(workspace, capsys):
    root, config = workspace
    assert cli(["eval", config["model"], "--data", str(root / "validation.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 4 and {"loss", "bleu", "chrf", "exact_match"} <= set(scores)
    assert cli(["eval", "minilm-l6", "--data", str(root / "sst-dev.tsv")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["examples"] == 20
    assert cli(["eval", "minilm-l6"]) == 2
    assert "--data" in capsys.readouterr().err


# --- 10. small inconsistencies ----------------------------------------------------------------------

def test_every_file_a_run_and_a_merge_write_has_the_usual_mode(workspace, tmp_path):
    root, config = workspace
    out = root / "runs" / "modes"
    assert cli(["train", str(write_config(root, short(config), "modes")), f"output={out}"]) == 0
    merged = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in [*out.rglob("*"), *merged.rglob("*")] if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert not wrong


def test_merge_refuses_to_overwrite_unless_told(workspace, tmp_path, capsys):
    root, config = workspace
    out = root / "runs" / "merge-twice"
    assert cli(["train", str(write_config(root, short(config), "merge-twice")), f"output={out}"]) == 0
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli(["merge", "--adapter", str(out), "--out", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"
    assert cli(["merge", "--adapter", str(out), "--out", str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").is_file() and not (target / "notes.txt").exists()


def test_samples_and_the_resolved_config_say_what_the_run_did(workspace):
    root, config = workspace
    out = root / "runs" / "resolved"
    cfg = write_config(root, {**short(config), "eval": {"max_new_tokens": 4, "samples": 2, "compare_base": False}},
                       "resolved")
    assert cli(["train", str(cfg), f"output={out}"]) == 0
    assert (out / "samples.md").read_text().count("## Example") == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["task"] == "causal_lm"


def test_commands_show_no_weight_loading_bars(workspace, capfd):
    root, config = workspace
    out = root / "runs" / "bars"
    assert cli(["train", str(write_config(root, short(config), "bars")), f"output={out}"]) == 0
    assert cli(["generate", "--adapter", str(out), "--max-new-tokens", "2", "name[Aromi]"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err


def test_train_needs_no_config_file_when_the_keys_are_given(workspace, monkeypatch):
    root, config = workspace
    monkeypatch.chdir(root)
    assert cli(["train", f"model={config['model']}", "data.train=train.jsonl", "train.max_steps=1",
                "lora.r=2", "output=runs/no-yaml"]) == 0
    saved = yaml.safe_load((root / "runs" / "no-yaml" / "config.yaml").read_text())
    assert saved["data"]["train"] == str(root / "train.jsonl") and saved["adapter"]["r"] == 2
