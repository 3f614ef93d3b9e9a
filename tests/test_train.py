"""The training pipeline end to end on a tiny model: run directory, resume after SIGKILL, torchrun,
bad data, the CLI, and training under transformers.Trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from runs import adapter_tensors, make_workspace, metric_steps, sst2_slice, train_until_killed, write_config

import feathertune as ft
from feathertune.cli import main as cli

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def test_a_run_writes_every_artifact_and_learns(workspace):
    root, config = workspace
    out = root / "runs" / "full"
    result = ft.run(ft.TrainConfig.from_dict({**config, "output": str(out)}), log=lambda *_: None)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "eval.json", "samples.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0]
    assert {"bleu", "base_bleu", "eval_loss"} <= set(result.metrics)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint and the final adapter load like any adapter, onto the same base.
    model, _ = ft.load_model(config["model"])
    ft.load_adapter(model, out / "adapter")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 6 and resolved["adapter"]["r"] == 4


def test_resume_after_sigkill_ends_with_the_same_adapter(workspace):
    """Kill the run with SIGKILL one step after its second checkpoint, resume, compare adapters."""
    root, config = workspace
    reference = root / "runs" / "unbroken"
    ft.run(ft.TrainConfig.from_dict({**config, "output": str(reference)}), log=lambda *_: None)

    out = root / "runs" / "killed"
    cfg = write_config(root, config, "killed", output=str(out))
    killed = train_until_killed([str(cfg)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    (out / "checkpoints" / ".step-000006.tmp").mkdir()  # as if killed while writing the next one

    assert cli(["train", str(cfg), "--resume"]) == 0
    ours, theirs = adapter_tensors(out), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]  # nothing duplicated or lost around the kill


def test_the_base_scores_are_the_base_whatever_the_method(workspace):
    """A prompt starts away from the base, so the step-0 loss reported as the base's must be taken
    with the adapter disabled: every method's run reports the same base loss."""
    root, config = workspace
    base_losses = {}
    for method, adapter in (("lora", None), ("prompt_tuning", {"num_virtual_tokens": 4})):
        values = {**config, "train": {**config["train"], "max_steps": 2, "eval_every": 1}}
        if adapter is not None:
            values = {**{k: v for k, v in values.items() if k != "lora"}, "method": method, "adapter": adapter}
        out = root / "runs" / f"base-{method}"
        result = ft.run(ft.TrainConfig.from_dict({**values, "output": str(out)}), log=lambda *_: None)
        base_losses[method] = result.metrics["base_eval_loss"]
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["eval_loss"] == base_losses[method]
    assert base_losses["lora"] == pytest.approx(base_losses["prompt_tuning"], abs=1e-6), base_losses


@pytest.mark.parametrize("method, adapter", [
    ("prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True}),  # its file folds the MLP away
    ("ia3", {}),
], ids=["prefix_tuning-mlp", "ia3"])
def test_every_method_resumes_after_sigkill_exactly(workspace, method, adapter):
    """The checkpoint holds the adapter as it trains, so a method whose file holds it only as it
    deploys (prefix tuning folds its MLP into plain prefixes) resumes exactly too."""
    root, config = workspace
    config = {**{k: v for k, v in config.items() if k != "lora"}, "method": method, "adapter": adapter}
    reference = root / "runs" / f"unbroken-{method}"
    ft.run(ft.TrainConfig.from_dict({**config, "output": str(reference)}), log=lambda *_: None)
    out = root / "runs" / f"killed-{method}"
    cfg = write_config(root, config, f"killed-{method}", output=str(out))
    killed = train_until_killed([str(cfg)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cli(["train", str(cfg), "--resume"]) == 0
    ours, theirs = adapter_tensors(out), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(workspace, capsys):
    root, config = workspace
    out = root / "runs" / "once"
    cfg = write_config(root, config, "once", output=str(out), train={"max_steps": 1})
    assert cli(["train", str(cfg)]) == 0
    assert cli(["train", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    fresh = write_config(root, config, "fresh", output=str(root / "runs" / "never"))
    assert cli(["train", str(fresh), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_two_processes_follow_the_single_process_loss_curve(workspace):
    """Same global batch (8): 2 processes × 4 × accum 1 against 1 process × 4 × accum 2."""
    root, config = workspace
    single, double = root / "runs" / "one-proc", root / "runs" / "two-procs"
    common = {"train": {"max_steps": 4, "batch_size": 4, "checkpoint_every": 0},
              "eval": {"compare_base": False}}
    cfg1 = write_config(root, config, "one", output=str(single), train={**common["train"], "grad_accum": 2},
                        eval=common["eval"])
    cfg2 = write_config(root, config, "two", output=str(double), train={**common["train"], "grad_accum": 1},
                        eval=common["eval"])
    assert cli(["train", str(cfg1)]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "feathertune.cli", "train",
                           str(cfg2)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    def curve(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    one, two = curve(single), curve(double)
    assert len(one) == len(two) == 4
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, two)), (one, two)


BROKEN_CHAT = {
    "bad JSON": ('{"messages": [{"role": "user", "content": "hi"}', "line 1", "not valid JSON"),
    "wrong role": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]}',
                   "messages[1].role", "asistant"),
    "empty content": ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
                      "messages[0].content", "empty"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}', "messages", "assistant"),
}


@pytest.mark.parametrize("case", list(BROKEN_CHAT))
def test_broken_chat_data_is_reported_by_line_and_nothing_is_written(workspace, capsys, case):
    root, config = workspace
    good = (root / "train.jsonl").read_text().splitlines()[:3]
    line, field, words = BROKEN_CHAT[case]
    data = root / f"broken-{case.replace(' ', '-')}.jsonl"
    data.write_text("\n".join(good + [line] + good) + "\n")
    out = root / "runs" / f"broken-{case.replace(' ', '-')}"
    cfg = write_config(root, config, "broken", output=str(out), data={"train": str(data)})
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:4" in err and field.split()[0] in err and words.lower() in err.lower(), err
    assert "Traceback" not in err
    assert not out.exists()


def test_every_broken_line_is_listed_in_one_error(workspace, capsys):
    root, config = workspace
    data = root / "all-broken.jsonl"
    data.write_text("\n".join(line for line, _, _ in BROKEN_CHAT.values()) + "\n")
    cfg = write_config(root, config, "all-broken", output=str(root / "runs" / "all-broken"),
                       data={"train": str(data)})
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    for number in (1, 2, 3, 4):
        assert f"{data}:{number}:" in err, err


def test_a_label_outside_the_label_set_is_reported(workspace, capsys):
    root, config = workspace
    train = root / "labels-train.tsv"
    train.write_text("sentence\tlabel\ngood film \t1\nbad film \t0\nfine \t1\n")
    validation = root / "labels-dev.tsv"
    validation.write_text("sentence\tlabel\nnice \t1\nodd \t2\n")
    out = root / "runs" / "labels"
    cfg = write_config(root, config, "labels", output=str(out), model="minilm-l6",
                       data={"train": str(train), "validation": str(validation)})
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{validation}:3" in err and "'2'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_cli_inspect_merge_and_generate(workspace, capsys, tmp_path):
    root, config = workspace
    out = root / "runs" / "cli"
    cfg = write_config(root, config, "cli", output=str(out), train={"max_steps": 2})
    assert cli(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "lora (LORA); mergeable" in shown and "trainable:" in shown and "MiB" in shown and "bleu=" in shown
    merged = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    model, _ = ft.load_model(config["model"])
    ft.load_adapter(model, out / "adapter")
    ids = torch.tensor([[5, 9, 14, 20, 31]])
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= 1e-4
    assert cli(["generate", "--adapter", str(out), "name[The Eagle]"]) == 0
    assert "> name[The Eagle]" in capsys.readouterr().out


def test_every_command_has_help():
    for command in ("train", "eval", "generate", "chat", "merge", "inspect"):
        with pytest.raises(SystemExit) as exit_info:
            cli([command, "--help"])
        assert exit_info.value.code == 0


def test_an_attached_model_trains_under_transformers_trainer(workspace, tmp_path):
    """Users with Trainer code keep it: two steps move only the adapter."""
    from transformers import Trainer, TrainingArguments

    root, config = workspace
    model, tokenizer = ft.load_model(config["model"])
    ft.attach(model, ft.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    texts = ["The Eagle is a coffee shop.", "Cotto serves Chinese food near The Portland Arms."] * 4
    rows = [{"input_ids": tokenizer(t).input_ids, "labels": tokenizer(t).input_ids} for t in texts]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch]),
                "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    assert any(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if n in adapter_before)
    ft.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_classification_run_trains_the_head_and_reports_accuracy(workspace):
    """MiniLM (embedded) + LoRA on a few SST-2 sentences: the new head is trained and saved too."""
    root, config = workspace
    train, dev = sst2_slice(root)
    out = root / "runs" / "sst"
    result = ft.run(ft.TrainConfig.from_dict({
        "model": "minilm-l6", "output": str(out),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": str(train), "validation": str(dev), "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 0},
    }), log=lambda *_: None)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and "base_accuracy" in result.metrics
    saved = adapter_tensors(out)
    assert "base_model.model.classifier.weight" in saved  # the head travels with the adapter
    config_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config_json["modules_to_save"] == ["classifier"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(workspace, monkeypatch, capsys):
    from feathertune import loss

    root, config = workspace
    out = root / "runs" / "diverged"
    cfg = write_config(root, config, "diverged", output=str(out))
    original = loss.loss_sum
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        value = original(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value  # the third step diverges

    monkeypatch.setattr(loss, "loss_sum", poisoned)
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "step 3: the loss is nan" in err and "step-000002" in err and "train.lr" in err, err
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "adapter").exists()


def test_gradient_checkpointing_and_bf16_runs_train(workspace):
    root, config = workspace
    for name, extra in (("ckpt", {"gradient_checkpointing": True}), ("bf16", {"precision": "bf16"})):
        out = root / "runs" / name
        ft.run(ft.TrainConfig.from_dict({**config, "output": str(out),
                                         "train": {**config["train"], "max_steps": 2, **extra},
                                         "eval": {"compare_base": False, "max_new_tokens": 4}}),
               log=lambda *_: None)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_eval_and_chat(workspace, capsys, monkeypatch):
    import io

    root, config = workspace
    out = root / "runs" / "eval-chat"
    cfg = write_config(root, config, "eval-chat", output=str(out), train={"max_steps": 2})
    assert cli(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert cli(["eval", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"loss", "bleu", "examples"} <= set(scores) and scores["examples"] == 4
    monkeypatch.setattr("sys.stdin", io.StringIO("name[The Eagle]\n/reset\nname[Cotto]\n/exit\n"))
    assert cli(["chat", "--adapter", str(out), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2
