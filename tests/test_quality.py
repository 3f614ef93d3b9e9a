"""`feathertune bench quality`: the plan (every row on one budget), the report, and — in the slow tier —
the whole bench in its --quick form on the real models and data: every method beats its untrained base."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from feathertune import quality, quality_report
from feathertune.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def test_every_row_of_a_suite_trains_on_one_budget(tmp_path):
    for suite in quality.SUITES.values():
        for quick in (False, True):
            jobs = quality._jobs(suite, quick, None, None, tmp_path)
            budgets = {tuple(o for o in job.overrides if o.startswith(("train.max_steps", "train.batch_size",
                                                                       "train.seed", "data.max_validation")))
                       for job in jobs}
            assert len(budgets) == 1, budgets
            steps = suite.quick_steps if quick else suite.steps
            assert f"train.max_steps={steps}" in next(iter(budgets))
            names = [job.row for job in jobs]
            assert len(set(names)) == len(names)
            assert {"base", "lora", "full", "peft-lora", "wise-lora", "wise-full"} <= set(names)
            for job in jobs:
                assert Path(job.recipe).is_file(), job.recipe


def test_peft_reference_uses_the_lora_rows_recipe_and_lp_ft_probes_a_quarter(tmp_path):
    for suite in quality.SUITES.values():
        jobs = {job.row: job for job in quality._jobs(suite, False, None, None, tmp_path)}
        assert jobs["peft-lora"].recipe == jobs["lora"].recipe
        assert jobs["peft-lora"].overrides == jobs["lora"].overrides
    jobs = {job.row: job for job in quality._jobs(quality.CLASSIFICATION, False, None, None, tmp_path)}
    assert f"train.lp_steps={quality.CLASSIFICATION.steps // 4}" in jobs["lp-ft"].overrides


def test_the_rows_cover_the_methods_the_issue_names():
    classification = {row.name for row in quality.CLASSIFICATION.rows}
    generation = {row.name for row in quality.GENERATION.rows}
    assert classification >= {"full", "top2", "bitfit", "lp-ft", "lora", "rslora", "dora", "qlora", "ia3", "houlsby",
                              "pfeiffer", "prompt-tuning", "loreft", "peft-lora"}
    assert generation >= {"lora", "dora", "qlora", "ia3", "houlsby", "prompt-tuning", "prefix-tuning",
                          "llama-adapter", "loreft", "full", "peft-lora"}


def test_a_job_is_rerun_when_its_settings_change(tmp_path):
    job = quality._jobs(quality.GENERATION, True, None, None, tmp_path)[2]
    path = tmp_path / "row.json"
    kept = {"score": 1.0, "job_key": job.key(), "general_sha": quality._general_sha()}
    path.write_text(json.dumps(kept))
    assert quality._read_kept(path, job) == kept
    changed = quality.dataclasses.replace(job, overrides=[*job.overrides, "train.lr=1e-3"])
    assert quality._read_kept(path, changed) is None
    path.write_text(json.dumps({**kept, "general_sha": "0" * 16}))  # measured on another general text
    assert quality._read_kept(path, job) is None


def test_bad_data_and_unknown_rows_are_refused_by_name(tmp_path, capsys):
    assert cli(["bench", "quality", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    train = tmp_path / "train.tsv"
    train.write_text("a fine film\t1\na dull film\t0\n")
    assert cli(["bench", "quality", "--data", str(train), "--out", str(tmp_path)]) == 2
    assert "--validation" in capsys.readouterr().err
    assert cli(["bench", "quality", "--only", "nosuchrow", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nosuchrow" in err and "generation:lora" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert cli(["bench", "quality", "--data", str(broken), "--validation", str(broken), "--out", str(tmp_path)]) == 2
    assert "broken.jsonl:2" in capsys.readouterr().err


def _figures(score: float, general_loss: float | None = None, drift: float | None = None, **extra) -> dict:
    row = {"score": score, "trainable": 1000, "base_parameters": 100_000, "adapter_bytes": 4096,
           "train_seconds": 10.0, "peak_memory_mib": 900.0, **extra}
    if general_loss is not None:
        row.update(general_loss=general_loss, measure="loss")
    if drift is not None:
        row.update(drift=drift, measure="drift")
    return row


def test_the_report_checks_each_claim_against_the_table(tmp_path):
    generation = {"base": _figures(14.0, general_loss=3.0), "lora": _figures(62.0, general_loss=3.3),
                  "full": _figures(61.0, general_loss=3.6, trainable=100_000), "peft-lora": _figures(61.5, general_loss=3.31),
                  "prompt-tuning": _figures(13.0, general_loss=3.1),
                  "wise-lora": {"interpolation": [{"alpha": a, "score": 14 + 48 * a ** 0.5, "general_loss": 3 + 0.3 * a}
                                                  for a in (0.25, 0.5, 0.75)]}}
    report = quality_report.render({"generation": generation}, [quality.GENERATION], False, "# header", tmp_path)
    assert "| LoRA | 62.00 | 1,000 | 1 % | 4 KiB | 10 s | 900 MiB | +10.00 (+0.300 nats) |" in report
    assert "| prefix tuning | (not run) |" in report
    assert re.search(r"✅ E2E: LoRA BLEU ≥ 60: 62.00", report)
    assert re.search(r"❌ E2E: every method above the base: .*prompt-tuning 13.00", report)
    assert re.search(r"✅ E2E: feathertune's LoRA within 1 BLEU of PEFT's", report)
    assert re.search(r"✅ E2E: LoRA forgets less than full fine-tuning .*\+10.00 % .* \+20.00 %", report)
    # full's BLEU 61 is nearest LoRA's α = 1 (62; α = 0.75: 55.6): that point's forgetting is compared
    assert re.search(r"✅ E2E: … and at comparable BLEU .*α = 1: BLEU 62.00, loss rise \+10.00 %", report)
    assert "| lora | 0.5 | 47.94 | +5.00 |" in report  # WiSE-FT: the sweep's point, forgetting from its general loss
    assert "| lora | 0 | 14.00 | +0.00 |" in report and "| lora | 1 | 62.00 | +10.00 |" in report  # the rows' own
    assert (tmp_path / "quality-generation.png").stat().st_size > 10_000
    assert (tmp_path / "quality-generation-wise.png").stat().st_size > 10_000


# Every method on both suites, reduced: about 30 minutes on 2 cores. By hand (the extended tier) until a whole
# pass of it has been timed alone, so that CI's slow tier is known to fit its 90 minutes with it.
@pytest.mark.extended
def test_quick_bench_every_method_beats_its_untrained_base(tmp_path):
    assert cli(["bench", "quality", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "quality-quick.md").read_text()
    assert report.startswith("# feathertune quality bench (quick)")
    for field in ("- command: `feathertune bench quality --quick`", "- date: ", "- machine: ", "- packages: "):
        assert field in report, field
    for suite in quality.SUITES.values():
        figures = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "quality" / "quick" / suite.name).glob("*.json")}
        assert set(figures) == {row.name for row in suite.rows} | {f"wise-{n}" for n in suite.wise}
        base = figures["base"]["score"]
        for row in suite.rows:
            if row.kind == "base":
                continue
            got = figures[row.name]
            assert got["score"] > base, (suite.name, row.name, got["score"], base)
            assert got["trainable"] > 0 and got["adapter_bytes"] > 0 and got["train_seconds"] > 0
            assert got["peak_memory_mib"] > 0
            assert got.get("general_loss") is not None or got.get("drift") is not None, got
            label = re.escape(row.label)
            assert re.search(rf"^\| {label} \| [0-9.]+ \| [0-9,]+ \| [0-9.e+-]+ % \| [0-9.]+ (KiB|MiB) \| \d+ s \| "
                             rf"[0-9,]+ MiB \| [+-][0-9.]+", report, re.M), row.label
        for name in suite.wise:
            points = figures[f"wise-{name}"]["interpolation"]
            assert [p["alpha"] for p in points] == [0.25, 0.5, 0.75]
        assert (tmp_path / f"quality-quick-{suite.name}.png").exists()
        assert (tmp_path / f"quality-quick-{suite.name}-wise.png").exists()
    assert "## The claims, checked" in report
