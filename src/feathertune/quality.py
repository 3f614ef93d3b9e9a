"""`feathertune bench quality`: every method on real data, one table — the papers' claims at laptop scale.

    feathertune bench quality [--quick] [--data FILE --validation FILE] [--out bench/results] [--only NAME,…]

Two suites, each on the embedded model the repository ships:
- classification: all-MiniLM-L6 with a new classification head on SST-2 (`data/sst2`), scored by
  accuracy on the dev file;
- generation: SmolLM2-135M-Instruct on E2E (`data/e2e`), scored by corpus BLEU against all references
  of each meaning representation on the validation file.

Every method trains with its recipe's settings (`recipes/<suite>-<method>.yaml`: rank, learning rate,
targets) on the SAME budget within a suite (steps, batch, seed), so a row differs from another in the
method only. PEFT's own LoRA trains on the same batches in the same order with the same optimizer and
schedule, as the reference row. Each row is measured in a process of its own, one after the other
(peak memory is the process's own; never two PyTorch processes at once), and its figures are kept in
`<out>/quality/<suite>/<row>.json`: an interrupted bench resumes where it stopped, a finished row is
not run again unless its settings changed (or `--fresh`).

Columns: the score; trainable parameters (count, and share of the base model's); the adapter's size
on disk; training wall time; peak memory of training (resident set size on the CPU); forgetting — the
rise of the loss on general text the model was not tuned for (`data/general`, WikiText), relative to
the base model (`evaluate.forgetting`; an encoder without a language-model head: the drift of its
sentence embeddings instead). WiSE-FT (Wortsman et al. 2022): the full fine-tune and LoRA interpolated
with their base at α ∈ {0, 0.25, 0.5, 0.75, 1}, scored and measured for forgetting.

Writes `<out>/quality.md` (the command, date, machine and package versions at its top, the tables,
the claims checked one by one) and `<out>/quality-*.png`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from feathertune.errors import FeathertuneError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a suite's table: a recipe and the overrides that make it this row."""

    name: str  # the row's key (file names, --only)
    label: str  # as the table shows it
    recipe: str  # recipes/<recipe>.yaml gives the method's settings
    overrides: tuple[str, ...] = ()  # KEY=VALUE, as `feathertune train` takes them
    kind: str = "feathertune"  # feathertune | peft (PEFT's LoRA on the same batches) | base (no training)


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    model: str
    metric: str  # "accuracy" or "bleu"
    train: str
    validation: str
    rows: tuple[Row, ...]
    steps: int  # the full run's budget, every row alike
    quick_steps: int
    batch_size: int
    quick_batch_size: int
    quick_validation: int  # --quick scores on the first N validation examples
    wise: tuple[str, ...] = ("full", "lora")  # rows interpolated with their base


CLASSIFICATION = Suite(
    name="classification", model="minilm-l6", metric="accuracy",
    train=str(ROOT / "data" / "sst2" / "train.tsv"), validation=str(ROOT / "data" / "sst2" / "dev.tsv"),
    rows=(
        Row("base", "base (untrained head)", "sst2-lora", kind="base"),
        Row("full", "full fine-tuning", "sst2-full"),
        Row("top2", "top 2 blocks + head", "sst2-partial"),
        Row("bitfit", "BitFit", "sst2-bitfit"),
        Row("lp-ft", "LP-FT (probe, then full)", "sst2-full", ("train.lp_steps=LP",)),
        Row("lora", "LoRA", "sst2-lora"),
        Row("rslora", "rsLoRA", "sst2-lora", ("method=rslora",)),
        Row("dora", "DoRA", "sst2-lora", ("method=dora",)),
        Row("qlora", "QLoRA (NF4 base)", "sst2-lora", ("method=qlora",)),
        Row("ia3", "(IA)³", "sst2-ia3"),
        Row("houlsby", "Houlsby adapters", "sst2-bottleneck", ("adapter.style=houlsby",)),
        Row("pfeiffer", "Pfeiffer adapters", "sst2-bottleneck", ("adapter.style=pfeiffer",)),
        Row("prompt-tuning", "prompt tuning", "sst2-prompt-tuning"),
        # One rank-4 intervention per block shared by the first and the last 3 tokens (the paper's GLUE
        # setting shares them too): 17.6× fewer parameters than the LoRA row, where unshared gives 9×.
        Row("loreft", "LoReFT (shared windows)", "sst2-reft", ("adapter.share_weights=true",)),
        Row("peft-lora", "PEFT's LoRA (reference)", "sst2-lora", kind="peft"),
    ),
    steps=400, quick_steps=40, batch_size=32, quick_batch_size=32, quick_validation=400)

GENERATION = Suite(
    name="generation", model="smollm2-135m-instruct", metric="bleu",
    train=str(ROOT / "data" / "e2e" / "train.jsonl"), validation=str(ROOT / "data" / "e2e" / "validation.jsonl"),
    rows=(
        Row("base", "base model", "e2e-lora", kind="base"),
        Row("full", "full fine-tuning", "e2e-full"),
        Row("lora", "LoRA", "e2e-lora"),
        Row("dora", "DoRA", "e2e-lora", ("method=dora",)),
        Row("qlora", "QLoRA (NF4 base)", "e2e-qlora"),
        Row("ia3", "(IA)³", "e2e-ia3"),
        Row("houlsby", "Houlsby adapters", "e2e-bottleneck", ("adapter.style=houlsby",)),
        Row("prompt-tuning", "prompt tuning", "e2e-prompt-tuning"),
        Row("prefix-tuning", "prefix tuning", "e2e-prefix-tuning"),
        Row("llama-adapter", "LLaMA-Adapter", "e2e-llama-adapter"),
        Row("loreft", "LoReFT", "e2e-reft"),
        Row("peft-lora", "PEFT's LoRA (reference)", "e2e-lora", kind="peft"),
    ),
    steps=60, quick_steps=16, batch_size=8, quick_batch_size=4, quick_validation=8)

SUITES = {suite.name: suite for suite in (CLASSIFICATION, GENERATION)}


@dataclasses.dataclass(frozen=True)
class Job:
    """What one row's process is given (JSON on its command line)."""

    suite: str
    row: str
    kind: str  # feathertune | peft | base | wise
    model: str
    recipe: str
    overrides: list[str]
    train: str
    validation: str
    run_dir: str
    alphas: list[float] = dataclasses.field(default_factory=list)  # wise: interpolate this row's run
    general_paragraphs: int | None = None  # --quick: the first N paragraphs of the general text

    def key(self) -> str:
        """A finished row is reused while its job is the same."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# --- the parent: plan, run each row in its own process, write the report ---------------------------

def run_quality(*, quick: bool = False, data: str | None = None, validation: str | None = None,
                out: str | os.PathLike = ROOT / "bench" / "results", work: str | os.PathLike | None = None,
                only: list[str] | None = None, fresh: bool = False, say=print, command: str | None = None) -> dict:
    """Run (or resume) the bench and write quality.md and the plots; returns every row's figures.

    Args:
        quick: the reduced budget CI runs (fewer steps and validation examples, a shorter general text).
        data, validation: the user's own files instead of the shipped ones: the suite is the one whose
            task the training file holds (labelled sentences: classification; chat: generation).
        out: where quality.md, the plots and the per-row figures (quality/) go.
        work: where the runs' directories go (default: <out>/quality/runs).
        only: row names ("lora") or suite:row ("generation:lora") to run; the report shows every row
            that has figures.
        fresh: run every row again, even those whose figures are kept.
    """
    from feathertune.errors import ConfigError

    out = Path(out)
    suites = _suites_for(data, validation)
    cache = out / "quality" / ("quick" if quick else "full")
    work = Path(work) if work else cache / "runs"
    results: dict[str, dict[str, dict]] = {}
    for suite in suites:
        jobs = _jobs(suite, quick, data, validation, work)
        wanted = [j for j in jobs if _selected(j, only)]
        if only and not wanted:
            continue
        results[suite.name] = {}
        for job in jobs:
            path = cache / suite.name / f"{job.row}.json"
            kept = _read_kept(path, job)
            if job in wanted and (fresh or kept is None):
                try:
                    kept = _run_job(job, path, say)
                except RowFailed as failure:  # the other rows still run; the table says which failed and why
                    say(str(failure))
                    kept = {"row": job.row, "error": failure.reason}
            if kept is not None:
                results[suite.name][job.row] = kept
    if only and not results:
        names = ", ".join(f"{s.name}:{r.name}" for s in suites for r in s.rows)
        raise ConfigError(f"--only {','.join(only)} matches no row; rows: {names}", source="bench quality")
    header = _header(command or "feathertune bench quality" + (" --quick" if quick else ""), quick)
    report = _report(results, suites, quick, header, out)
    (out / ("quality-quick.md" if quick else "quality.md")).write_text(report)
    say(report)
    failed = [f"{suite}:{row}" for suite, rows in results.items() for row, got in rows.items() if "error" in got]
    if failed:
        raise RowFailed(f"{len(failed)} row(s) failed: {', '.join(failed)} (the report shows why; rerun the same "
                        f"command to run just those)")
    return results


class RowFailed(FeathertuneError):
    """A row's process failed (the bench goes on with the others and says so at the end)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def _suites_for(data: str | None, validation: str | None) -> list[Suite]:
    """The shipped suites, or the one that fits the user's training file."""
    from feathertune.data import read_examples
    from feathertune.errors import ConfigError

    if data is None:
        if validation is not None:
            raise ConfigError("--validation goes with --data (the training file it scores)", source="bench quality")
        return [CLASSIFICATION, GENERATION]
    if validation is None:
        raise ConfigError(f"--data {data}: pass --validation FILE too: the file every method is scored on "
                          f"(labelled sentences for classification, chat examples or references for generation)",
                          source="bench quality")
    kind = read_examples(data).kind  # a bad file fails here, by file and line, before anything trains
    read_examples(validation)
    if kind == "classification":
        return [dataclasses.replace(CLASSIFICATION, train=str(Path(data).resolve()),
                                    validation=str(Path(validation).resolve()))]
    if kind == "chat":
        return [dataclasses.replace(GENERATION, train=str(Path(data).resolve()),
                                    validation=str(Path(validation).resolve()))]
    raise ConfigError(f"--data {data} holds {kind} examples; the bench compares methods on classification "
                      f"(sentence + label) or chat data", source="bench quality")


def _jobs(suite: Suite, quick: bool, data: str | None, validation: str | None, work: Path) -> list[Job]:
    steps = suite.quick_steps if quick else suite.steps
    batch = suite.quick_batch_size if quick else suite.batch_size
    budget = [f"train.max_steps={steps}", f"train.batch_size={batch}", "train.seed=0",
              f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", "train.checkpoint_every=0",
              "eval.compare_base=false", "eval.samples=0"]
    if quick:
        budget.append(f"data.max_validation={suite.quick_validation}")
    train = suite.train
    if quick:  # fewer examples too: tokenizing all of SST-2's 60,614 sentences would take longer than training
        train = _first_examples(suite.train, 4 * steps * batch, work / f"{suite.name}-train{Path(suite.train).suffix}")
    jobs = []
    for row in suite.rows:
        overrides = [o.replace("train.lp_steps=LP", f"train.lp_steps={steps // 4}") for o in row.overrides]
        jobs.append(Job(suite.name, row.name, row.kind, suite.model, str(RECIPES / f"{row.recipe}.yaml"),
                        budget + overrides, train, suite.validation, str(work / suite.name / row.name),
                        general_paragraphs=20 if quick else None))
    by_name = {j.row: j for j in jobs}
    for name in suite.wise:
        tuned = by_name[name]
        jobs.append(dataclasses.replace(tuned, row=f"wise-{name}", kind="wise",
                                        alphas=[a for a in WISE_ALPHAS if 0 < a < 1]))
    return jobs


def _first_examples(path: str, count: int, out: Path) -> str:
    """The file's first `count` examples (and its header line, for TSV/CSV) written to `out`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[:1] if Path(path).suffix in (".tsv", ".csv") else []
    text = "\n".join(header + lines[len(header): len(header) + count]) + "\n"
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return str(out)


def _selected(job: Job, only: list[str] | None) -> bool:
    if not only:
        return True
    return any(name in (job.row, f"{job.suite}:{job.row}", job.suite) for name in only)


def _read_kept(path: Path, job: Job) -> dict | None:
    """A row's kept figures, if they were measured for this job on the general text as it is now."""
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept if kept.get("job_key") == job.key() and kept.get("general_sha") == _general_sha() else None


def _general_sha() -> str:
    from feathertune.evaluate import GENERAL_TEXT

    return hashlib.sha256(GENERAL_TEXT.read_bytes()).hexdigest()[:16]


def _run_job(job: Job, path: Path, say) -> dict:
    """One row in a process of its own; its figures are written atomically to `path`."""
    from feathertune.files import write_atomic

    say(f"[bench quality] {job.suite}: {job.row} ({job.kind}) …")
    if job.kind in ("feathertune", "peft") and Path(job.run_dir).exists():
        shutil.rmtree(job.run_dir)  # a row that was interrupted: it starts again (its run has no checkpoints)
    started = time.perf_counter()
    command = [sys.executable, "-m", "feathertune.quality", json.dumps(dataclasses.asdict(job))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise RowFailed(f"bench quality: {job.suite}:{job.row} failed (exit {done.returncode}):\n{done.stderr[-4000:]}",
                        reason=f"exit {done.returncode}: {last[0][:300]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures.update(job_key=job.key(), general_sha=_general_sha(), process_seconds=round(time.perf_counter() - started, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(figures, indent=2) + "\n")
    say(f"[bench quality] {job.suite}: {job.row}: {_brief(figures)}")
    return figures


def _brief(figures: dict) -> str:
    if "interpolation" in figures:
        return ", ".join(f"α={p['alpha']:g}: {p['score']:.3g}" for p in figures["interpolation"])
    return f"score {figures['score']:.4g}, {figures.get('train_seconds') or 0:.0f} s"


# --- one row, in its own process ---------------------------------------------------------------------

def _child(job: Job) -> dict:
    import torch

    torch.manual_seed(0)
    if job.kind == "base":
        return _measure_base(job)
    if job.kind == "feathertune":
        return _measure_feathertune(job)
    if job.kind == "peft":
        return _measure_peft(job)
    if job.kind == "wise":
        return _measure_wise(job)
    raise ValueError(f"unknown row kind {job.kind!r}")


def _config(job: Job):
    from feathertune.train.config import load_config

    return load_config(job.recipe, [f"model={job.model}", f"data.train={job.train}",
                                    f"data.validation={job.validation}", f"output={job.run_dir}", *job.overrides])


def _validation(job: Job, tokenizer, config, label_names=None):
    from feathertune.data import read_examples, tokenize_examples

    examples = read_examples(job.validation, config.data.validation_format, label_names=label_names)
    if config.data.max_validation:
        examples.items = examples.items[: config.data.max_validation]
    return examples, tokenize_examples(examples, tokenizer, config.data.max_length)


def _task_score(model, tokenizer, examples, tokens, config) -> dict:
    """The suite's score (accuracy in %, or BLEU) and the validation loss, as `feathertune eval` gives them."""
    from feathertune.train.report import _scores as scores  # `feathertune eval`'s own scoring

    task = "classification" if examples.kind == "classification" else "causal_lm"
    found = scores(model, tokenizer, examples, tokens, task, config.eval.batch_size, config.eval.max_new_tokens)
    score = 100 * found["accuracy"] if task == "classification" else found["bleu"]
    return {"score": score, **found}


def _general_loss(model, tokenizer, job: Job, base=None) -> dict:
    """A causal LM's loss on the general text (the parent subtracts the base row's); an encoder, which
    has no loss on text, the drift of its pooled representations from `base`'s (`evaluate.forgetting`)."""
    from feathertune import evaluate

    texts = evaluate.general_text()[: job.general_paragraphs or None]
    score = evaluate.general_score(model, tokenizer, texts)
    if score.measure == "loss":
        return {"general_loss": score.loss, "general_tokens": score.tokens, "measure": "loss"}
    drift = evaluate.forgetting_figures(score, evaluate.general_score(base, tokenizer, texts), len(texts))
    return {"drift": drift["forgetting"], "general_tokens": score.tokens, "measure": "drift"}


def _load_base(job: Job, config, label_names=None, quantize=None):
    from feathertune.models import load_model

    task = "classification" if job.suite == "classification" else "causal_lm"
    return load_model(job.model, task=task, label_names=label_names, quantize=quantize)


def _label_names(job: Job):
    from feathertune.data import read_examples

    return read_examples(job.train).label_names if job.suite == "classification" else None


def _measure_base(job: Job) -> dict:
    """The untrained base: the score every method must beat, and the general loss forgetting is measured from."""
    from feathertune.adapters import trainable_parameters

    config = _config(job)
    labels = _label_names(job)
    model, tokenizer = _load_base(job, config, labels)
    examples, tokens = _validation(job, tokenizer, config, labels)
    figures = {"row": job.row, "label": "base", **_task_score(model, tokenizer, examples, tokens, config),
               "base_parameters": trainable_parameters(model)[1], "trainable": 0}
    if job.suite == "generation":  # an encoder's drift from itself is 0: nothing to measure
        figures.update(_general_loss(model, tokenizer, job))
    return figures


def _measure_feathertune(job: Job) -> dict:
    """Train the row with feathertune's `run`, then measure the saved adapter as a user would load it."""
    from feathertune.adapters import trainable_parameters
    from feathertune.checkpoint import load_adapter
    from feathertune.train.loop import run

    config = _config(job)
    started = time.perf_counter()
    result = run(config, log=lambda *_: None)
    wall = time.perf_counter() - started
    trained = result.metrics
    labels = config.data.labels
    model, tokenizer = _load_base(job, config, labels, quantize=config.quantization)
    base_parameters = trainable_parameters(model)[1]  # before the adapter; a 4-bit layer counts its weights
    base = _load_base(job, config, labels)[0] if job.suite == "classification" else None  # drift needs it
    load_adapter(model, result.adapter)
    figures = {"row": job.row, "method": config.method, "score": _metric(trained, job.suite),
               "train_seconds": trained.get("train_seconds"), "run_seconds": round(wall, 1),
               "peak_memory_mib": trained.get("peak_memory_mib"), "trainable": trained.get("trainable_parameters"),
               "base_parameters": base_parameters,
               "adapter_bytes": _directory_bytes(result.adapter), "eval": trained}
    figures.update(_general_loss(model, tokenizer, job, base=base))
    return figures


def _metric(results: dict, suite: str) -> float:
    return 100 * results["accuracy"] if suite == "classification" else results["bleu"]


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _measure_peft(job: Job) -> dict:
    """PEFT's LoRA (`get_peft_model`) with the LoRA row's settings, trained on the same batches in the
    same order, with the same AdamW, schedule and clipping, by the loop PEFT's users write:
    `model(**batch).loss.backward()`. Scored by the same functions as every other row."""
    import peft
    import torch

    from feathertune.data import collate, read_examples, tokenize_examples
    from feathertune.train.loop import PeakMemory, _EpochBatches, _schedule

    config = _config(job)
    loop, lora = config.train, config.adapter
    train_set = read_examples(job.train, config.data.format)
    labels = train_set.label_names if job.suite == "classification" else None
    base, tokenizer = _load_base(job, config, labels)
    model, _ = _load_base(job, config, labels)
    train_tok = tokenize_examples(train_set, tokenizer, config.data.max_length)
    examples, val_tok = _validation(job, tokenizer, config, labels)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    torch.manual_seed(loop.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=list(lora.modules_to_save or []) or None,
        task_type="SEQ_CLS" if job.suite == "classification" else "CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(loop.schedule, loop.warmup_steps, loop.max_steps))
    steps_per_epoch = -(-len(train_tok.rows) // loop.batch_size)
    batches = _EpochBatches(train_tok.lengths, loop.batch_size, steps_per_epoch, loop)
    model.train()
    memory = PeakMemory(torch.device("cpu"))
    started = time.perf_counter()
    for step in range(loop.max_steps):
        batch = collate([train_tok.rows[i] for i in batches.at(step)], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        if loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - started
    peak = memory.peak_mib()
    model.eval()
    saved = Path(job.run_dir) / "adapter"
    model.save_pretrained(saved)
    figures = {"row": job.row, "method": "peft-lora", "train_seconds": round(train_seconds, 1), "peak_memory_mib": peak,
               "trainable": sum(p.numel() for p in params), "base_parameters": sum(p.numel() for p in base.parameters()),
               "adapter_bytes": _directory_bytes(saved), "peft_version": peft.__version__}
    figures.update(_task_score(model, tokenizer, examples, val_tok, config))
    figures.update(_general_loss(model, tokenizer, job, base=base))
    return figures


def _measure_wise(job: Job) -> dict:
    """WiSE-FT: the row's fine-tune interpolated with its base, (1 − α)·θ_base + α·θ_tuned, at each α."""
    from feathertune.checkpoint import load_adapter
    from feathertune.interpolation import interpolate

    config = _config(job)
    labels = config.data.labels or _label_names(job)
    base, tokenizer = _load_base(job, config, labels)
    model, _ = _load_base(job, config, labels)
    adapter = Path(job.run_dir) / "adapter"
    if not adapter.exists():
        raise FileNotFoundError(f"{adapter}: the {job.row.removeprefix('wise-')} row must run before its WiSE-FT sweep")
    load_adapter(model, adapter)
    examples, tokens = _validation(job, tokenizer, config, labels)
    points = []
    for alpha in job.alphas:
        mixed = interpolate(model, alpha)
        point = {"alpha": alpha, **_task_score(mixed, tokenizer, examples, tokens, config)}
        point.update(_general_loss(mixed, tokenizer, job, base=base))
        points.append(point)
    return {"row": job.row, "interpolation": points}


# --- the report ----------------------------------------------------------------------------------------

def _header(command: str, quick: bool) -> str:
    import torch
    import transformers

    import feathertune

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "\n".join([
        f"# feathertune quality bench{' (quick)' if quick else ''}", "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}",
        f"- packages: feathertune {feathertune.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft_version}, Python {platform.python_version()}",
    ])


def _report(results: dict, suites: list[Suite], quick: bool, header: str, out: Path) -> str:
    from feathertune import quality_report

    return quality_report.render(results, suites, quick, header, out)


if __name__ == "__main__":
    job = Job(**json.loads(sys.argv[1]))
    print(json.dumps(_child(job)))
