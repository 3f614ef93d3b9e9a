"""The `feathertune` command: train, eval, generate, chat, merge, interpolate, inspect.

Every subcommand is a thin shell over the Python API; errors that feathertune raises on purpose
are printed as one clear message (exit status 2), never as a traceback. Commands that take a run
or an adapter read from it what it was trained for (base model, task, labels, quantization).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from feathertune.errors import ConfigError, FeathertuneError

if TYPE_CHECKING:
    from feathertune.train.config import TrainConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
ROOT_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
EPILOG = "Run `feathertune COMMAND --help` for a command's options. Docs: README.md."


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except FeathertuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feathertune", description="Parameter-efficient fine-tuning.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a YAML config says",
                       usage="feathertune train [CONFIG] [KEY=VALUE ...] [--resume]",
                       description="Fine-tune as CONFIG says; KEY=VALUE pairs override its keys "
                                   "(e.g. train.lr=1e-3 output=runs/try2), and without CONFIG they are the "
                                   "whole config (e.g. data.train=train.jsonl). Paths in CONFIG are relative "
                                   "to CONFIG, paths in KEY=VALUE to the current directory. "
                                   "See README 'Configuration'.")
    p.add_argument("arguments", nargs="*", metavar="CONFIG | KEY=VALUE",
                   help="a YAML config (optional, e.g. recipes/e2e-lora.yaml), then dotted keys to set")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output=RUN_DIR from its newest checkpoint, with its saved config; "
                        "only the number of steps and how often to log, evaluate and checkpoint may change")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="score a run's adapter, or a base model, on a data file")
    p.add_argument("run", metavar="RUN | ADAPTER | MODEL",
                   help="run directory (config.yaml + adapter/), adapter directory, or a base model alone "
                        "(an embedded name, a model directory, a .gguf file or a hub id; needs --data)")
    p.add_argument("--data", help="data file (default: the run's validation file)")
    p.add_argument("--model", help="base model (default: from the run or the adapter)")
    p.add_argument("--alpha", type=_alphas, metavar="A,B,…",
                   help="WiSE-FT: score (1 − α)·base + α·fine-tuned for each α (e.g. 0,0.25,0.5,0.75,1) and "
                        "plot the curve into the run directory")
    p.add_argument("--forgetting", action="store_true",
                   help="also measure forgetting: the rise of the loss on general text (WikiText, Wikipedia "
                        "prose) over the base's; for an encoder, how far its representations of it moved")
    p.add_argument("--general", metavar="FILE",
                   help="the general text for --forgetting, one paragraph a line (implies --forgetting; "
                        "default: data/general/wikitext.txt)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("generate", help="answer prompts with the base model or an adapter")
    p.add_argument("prompts", nargs="+", help="user messages, one answer each")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(handler=_generate)

    p = sub.add_parser("chat", help="talk to the model interactively (/reset, /exit)")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(handler=_chat)

    p = sub.add_parser("merge", help="fold an adapter into the base and write a full model directory "
                                     "(mergeable methods: LoRA and its variants, (IA)³, partial and full)")
    p.add_argument("--adapter", required=True, help="adapter directory (or run directory)")
    p.add_argument("--out", required=True, help="where to write the merged model (transformers format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--model", help="base model (default: from the run or the adapter)")
    p.add_argument("--dequantize", action="store_true",
                   help="for a QLoRA run: merge into the full-precision base (the exact export) instead "
                        "of rounding the merged weights back to NF4")
    p.set_defaults(handler=_merge)

    p = sub.add_parser("interpolate", help="WiSE-FT: write (1 − α)·base + α·fine-tuned as a model directory",
                       description="Interpolate the base and a run's fine-tune in every tensor (Wortsman et "
                                   "al. 2022) and write a transformers model directory. Needs a mergeable "
                                   "method: LoRA and its variants, (IA)³, partial or full fine-tuning.")
    p.add_argument("run", metavar="RUN | ADAPTER", help="run directory or adapter directory")
    p.add_argument("--alpha", type=float, required=True, help="0: the base, 1: the fine-tune, 0.5: halfway")
    p.add_argument("--out", required=True, help="where to write the model (transformers format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--model", help="base model (default: from the run or the adapter)")
    p.set_defaults(handler=_interpolate)

    p = sub.add_parser("inspect", help="what an adapter or run directory holds")
    p.add_argument("path", help="adapter directory or run directory")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("serve", help="the OpenAI-compatible fine-tuning service: files, jobs, chat, dashboard",
                       description="Serve OpenAI's files, fine-tuning jobs, models and chat completions API on "
                                   "this machine (code written for the `openai` client works unchanged), with a "
                                   "dashboard at /. Every /v1 route needs `Authorization: Bearer KEY`: the key is "
                                   "$FEATHERTUNE_API_KEY, --api-key-file, or one generated at the first start "
                                   "(printed, and kept in DATA/api_key).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="uploads, jobs, adapters and the SQLite state (default: "
                                      "$FEATHERTUNE_HOME/service, i.e. ~/.cache/feathertune/service)")
    p.add_argument("--model", action="append", metavar="NAME[=PATH]",
                   help=f"a base model jobs may fine-tune and chat may use; repeat for more (default: {DEFAULT_MODEL})")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest upload accepted (413 above it)")
    p.add_argument("--workers", type=int, default=1, help="jobs trained at once (0: API only); on a CUDA "
                                                         "machine each running job gets its own GPU")
    p.add_argument("--max-adapters", type=int, default=8, help="fine-tuned adapters kept in memory for chat")
    p.add_argument("--database-url", help="postgresql://USER@HOST/DB to keep the state (and the job queue) "
                                          "on PostgreSQL, shared by several --worker processes (default: SQLite)")
    p.add_argument("--worker", action="store_true",
                   help="run jobs only (no API): several of these on different machines share one "
                        "--database-url queue and one --data-dir")
    p.add_argument("--api-key-file", help="a file of accepted keys, one per line")
    p.add_argument("--lease-s", type=float, default=30.0,
                   help="a running job whose worker has not said it is alive for this long (a dead machine) "
                        "is taken over by another worker; on the same machine a dead worker is seen at once")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("bench", help="measure: `bench speed` (LoRA's speed against PEFT's), `bench quality` "
                                     "(every method's score, size, time, memory and forgetting)")
    bench = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    p = bench.add_parser("speed", help="LoRA training throughput and peak memory: feathertune vs PEFT + AdamW",
                         description="Train LoRA (r=16, all linear layers) with feathertune, with PEFT's "
                                     "get_peft_model + model(labels=...).loss and with TRL's SFTTrainer on the same "
                                     "E2E batches (DoRA and full fine-tuning too), each in a process of its own, one "
                                     "after the other; time greedy generation; print the ratios. --sweep: "
                                     "throughput and memory against sequence length and batch size instead.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data", help="a chat JSONL file (default: the repository's data/e2e/train.jsonl)")
    p.add_argument("--out", help="also write speed.json (with --sweep: sweep.json, sweep.md, sweep.png) here")
    p.add_argument("--sweep", action="store_true", help="PEFT vs feathertune at 128-1024 tokens per row (batch 4) "
                                                        "and batch 1-8 (256 tokens), --steps measured steps each")
    p.set_defaults(handler=_bench_speed)
    p = bench.add_parser("quality", help="every method on SST-2 (MiniLM) and E2E (SmolLM2): score, parameters, "
                                         "file size, time, memory, forgetting; WiSE-FT curves",
                         description="Train every method on the same budget, each in a process of its own (PEFT's "
                                     "LoRA too, as the reference row), score it, measure its forgetting on general "
                                     "text, sweep WiSE-FT for the full fine-tune and LoRA, and write quality.md and "
                                     "its plots. Finished rows are kept: an interrupted bench resumes. About 3 hours "
                                     "on 2 CPU cores; --quick: about half an hour.")
    p.add_argument("--quick", action="store_true", help="a reduced run (few steps and examples) that shows every "
                                                        "method trains; writes quality-quick.md")
    p.add_argument("--data", help="your own training file instead of SST-2 / E2E (labelled sentences or chat JSONL)")
    p.add_argument("--validation", help="the file to score on (with --data)")
    p.add_argument("--out", default=str(ROOT_RESULTS), help=f"where quality.md and the plots go (default: {ROOT_RESULTS})")
    p.add_argument("--work", help="where the runs' directories go (default: OUT/quality/<full|quick>/runs)")
    p.add_argument("--only", type=lambda text: [n for n in text.split(",") if n],
                   metavar="ROW,…", help="run only these rows (lora, generation:lora, or a suite); the report "
                                         "shows every row with figures")
    p.add_argument("--fresh", action="store_true", help="run every chosen row again, even those already measured")
    p.set_defaults(handler=_bench_quality)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"base model (default: {DEFAULT_MODEL}, or the adapter's)")
    p.add_argument("--adapter", help="adapter or run directory to apply")


@dataclasses.dataclass
class Target:
    """What a command works on: a base model, and the adapter (and run) on it, if any."""

    model: str  # what load_model takes
    adapter: Path | None = None
    config: TrainConfig | None = None  # the run's config.yaml, when the adapter belongs to a run
    task: str = "causal_lm"
    labels: list[str] | None = None  # classification: the head's labels, in index order
    quantize: str | None = None  # how the run quantized the base


def resolve_target(path: str | None, model: str | None, *, model_alone: bool = False) -> Target:
    """The base model, adapter, run config and task behind a command's RUN / ADAPTER argument.

    Args:
        path: a run directory, an adapter directory (inside a run or not), or None: the base alone.
        model: --model, which replaces the base that the run or the adapter names.
        model_alone: `path` may also be a base model (for `eval`).
    """
    from feathertune.file_layout import CONFIG_FILE
    from feathertune.train.config import load_config

    if path is None:
        return Target(model or DEFAULT_MODEL)
    where = Path(path)
    adapter = where / "adapter" if (where / "adapter" / CONFIG_FILE).is_file() else where
    if not (adapter / CONFIG_FILE).is_file():
        if model_alone:
            return Target(model or path)  # load_model says what is wrong with it, if anything
        raise FileNotFoundError(f"{path}: neither a run directory (config.yaml + adapter/) nor an adapter "
                                f"directory ({CONFIG_FILE})")
    written = json.loads((adapter / CONFIG_FILE).read_text())
    run_file = next((d / "config.yaml" for d in (where, adapter.parent) if (d / "config.yaml").is_file()), None)
    config = load_config(run_file) if run_file else None
    task = "classification" if written.get("task_type") == "SEQ_CLS" else "causal_lm"
    if config is not None and config.task != "auto":  # older runs saved task: auto
        task = config.task
    labels = None
    if task == "classification":
        labels = (config.data.labels if config else None) or _head_labels(adapter)
    base = model or (config.model if config else _recorded_base(written))
    return Target(base, adapter, config, task, labels, config.quantization if config else None)


def _recorded_base(written: dict) -> str:
    """The base an adapter file names: its path, or the embedded model that path was made from
    when it does not exist on this machine."""
    from feathertune.models import embedded_name_of

    recorded = written.get("base_model_name_or_path") or DEFAULT_MODEL
    return recorded if Path(recorded).exists() else embedded_name_of(recorded) or recorded


def _head_labels(adapter: Path) -> list[str] | None:
    """Labels "0", "1", … for the classification head saved in an adapter file, one per row."""
    from safetensors import safe_open

    from feathertune.file_layout import PREFIX, WEIGHTS_FILE

    with safe_open(str(adapter / WEIGHTS_FILE), framework="pt") as f:
        for head in ("classifier.out_proj.weight", "classifier.weight", "score.weight"):
            if PREFIX + head in f.keys():
                return [str(i) for i in range(f.get_slice(PREFIX + head).get_shape()[0])]
    return None


def _load(path: str | None, model_name: str | None, *, task: str | None = None, full_precision: bool = False):
    """The base model (quantized as the run was, unless full_precision) with the adapter loaded.

    Args:
        task: the task the command needs; an adapter for another task is refused.
    """
    from feathertune.checkpoint import load_adapter
    from feathertune.models import load_model

    target = resolve_target(path, model_name)
    if task is not None and target.task != task:
        raise ConfigError(f"{path} is a {target.task} adapter, and this command needs a {task} model; score it "
                          f"with `feathertune eval {path} --data FILE`", source="adapter")
    labels = {"label_names": target.labels} if target.task == "classification" else {}
    model, tokenizer = load_model(target.model, task=target.task,
                                  quantize=None if full_precision else target.quantize, **labels)
    if target.adapter is not None:
        load_adapter(model, target.adapter)
    return model, tokenizer


def _train(args) -> int:
    from feathertune.train.config import load_config, resume_config
    from feathertune.train.loop import run

    path, overrides = _config_and_overrides(args.arguments)
    config = resume_config(path, overrides) if args.resume else load_config(path, overrides)
    run(config, resume=args.resume)
    return 0


def _config_and_overrides(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(config file or None, KEY=VALUE overrides): a config file, if any, comes first."""
    if arguments and ("=" not in arguments[0] or Path(arguments[0]).is_file()):
        return arguments[0], arguments[1:]
    return None, arguments


def _generate(args) -> int:
    from feathertune import evaluate

    model, tokenizer = _load(args.adapter, args.model, task="causal_lm")
    answers = evaluate.generate(model, tokenizer, [[{"role": "user", "content": p}] for p in args.prompts],
                                max_new_tokens=args.max_new_tokens, progress=False)
    for prompt, answer in zip(args.prompts, answers):
        print(f"> {prompt}\n{answer}\n")
    return 0


def _chat(args) -> int:
    from feathertune import evaluate

    model, tokenizer = _load(args.adapter, args.model, task="causal_lm")
    history: list[dict] = []
    print("chatting with the model; /reset forgets the conversation, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = evaluate.generate(model, tokenizer, [history], max_new_tokens=args.max_new_tokens, progress=False)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")


def _eval(args) -> int:
    from feathertune.train.report import evaluate_run

    target = resolve_target(args.run, args.model, model_alone=True)
    config = target.config
    data = args.data or (config.data.validation if config else None)
    if not data:
        missing = " (the run has no validation file)" if config else ""
        raise ConfigError(f"no data to evaluate {args.run} on{missing}: pass --data FILE", source="eval")
    options = {}
    if config is not None:
        options = {"max_length": config.data.max_length, "batch_size": config.eval.batch_size,
                   "max_new_tokens": config.eval.max_new_tokens}
        if not args.data:
            options["data_format"] = config.data.validation_format
    if args.alpha is not None and target.adapter is None:
        raise ConfigError(f"--alpha interpolates a fine-tune with its base, and {args.run} is a base model alone; "
                          f"give a run or adapter directory", source="eval")
    quantize = None if args.alpha is not None else target.quantize  # weights interpolate in full precision
    results = evaluate_run(target.model, target.adapter, data=data, quantize=quantize,
                           label_names=target.labels, alphas=args.alpha, forgetting=args.forgetting,
                           general=args.general, **options)
    print(json.dumps(results, indent=2))
    if args.alpha is not None:
        from feathertune.train.metrics import plot_interpolation

        png = target.adapter.parent / f"wise_ft-{Path(data).stem}.png" if target.config else \
            target.adapter / f"wise_ft-{Path(data).stem}.png"
        plot_interpolation(results["interpolation"], png, title=f"WiSE-FT on {Path(data).name}")
        print(f"curve written to {png}", file=sys.stderr)
    return 0


def _alphas(text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 0,0.5,1") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one α, e.g. 0,0.5,1")
    return values


def _interpolate(args) -> int:
    from feathertune.interpolation import interpolate
    from feathertune.models import save_model_directory

    _refuse_existing(Path(args.out), args.overwrite, "interpolate")
    target = resolve_target(args.run, args.model)
    model, tokenizer = _load(args.run, args.model, full_precision=True)
    mixed = interpolate(model, args.alpha)
    save_model_directory(mixed, tokenizer, args.out)
    _check_reloads(Path(args.out), mixed, target.task)
    print(f"interpolated model (α = {args.alpha:g}) written to {args.out} (load it with transformers' "
          f"from_pretrained)")
    return 0


def _check_reloads(directory: Path, model, task: str) -> None:
    """Load the written directory with transformers and compare logits: a tensor the architecture's
    config cannot hold (BitFit's new biases on a bias-free model) would be dropped silently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from feathertune.models import transformers_bars_off

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with transformers_bars_off():
        reloaded = auto.from_pretrained(directory).to(next(model.parameters()).device).eval()
    ids = torch.arange(1, 17, device=next(model.parameters()).device)[None] % model.config.vocab_size
    with torch.no_grad():
        gap = (reloaded(input_ids=ids).logits.float() - model.eval()(input_ids=ids).logits.float()).abs().max().item()
    if gap > 1e-4:
        raise ConfigError(f"{directory}: transformers reloads it with other outputs (logits differ by {gap:.3g}); "
                          f"the fine-tune holds tensors this architecture's config does not load (e.g. BitFit's "
                          f"new biases on a bias-free model). Keep the adapter attached instead", source="interpolate")


def _merge(args) -> int:
    from feathertune.adapters import merge
    from feathertune.models import save_model_directory

    _refuse_existing(Path(args.out), args.overwrite, "merge")
    model, tokenizer = _load(args.adapter, args.model, full_precision=args.dequantize)
    save_model_directory(merge(model), tokenizer, args.out)
    print(f"merged model written to {args.out} (load it with transformers' from_pretrained)")
    return 0


def _refuse_existing(out: Path, overwrite: bool, command: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out, or pass --overwrite "
                          f"to replace it", source=command)


def _serve(args) -> int:
    from feathertune.models import feathertune_home
    from feathertune.service.server import Settings, parse_models, serve

    problems = [f"{name}={value}: use a positive number" for name, value in
                (("--port", args.port), ("--max-upload-mb", args.max_upload_mb),
                 ("--max-adapters", args.max_adapters), ("--lease-s", args.lease_s)) if value <= 0]
    if args.workers < 0:
        problems.append(f"--workers={args.workers}: use 0 (an API alone) or more")
    if problems:
        raise ConfigError(problems, source="serve")
    settings = Settings(data_dir=args.data_dir or str(feathertune_home() / "service"),
                        models=parse_models(args.model, DEFAULT_MODEL), host=args.host, port=args.port,
                        database_url=args.database_url, workers=args.workers, worker_only=args.worker,
                        max_upload_mb=args.max_upload_mb, max_adapters=args.max_adapters,
                        api_key_file=args.api_key_file, lease_s=args.lease_s)
    return serve(settings)


def _bench_speed(args) -> int:
    from feathertune.speed import run_speed, run_sweep

    if args.steps < 1 or args.batch < 1:
        raise ConfigError(f"--steps={args.steps}, --batch={args.batch}: both must be positive", source="bench speed")
    if args.sweep:
        run_sweep(args.model, args.steps, args.data, args.out)
    else:
        run_speed(args.model, args.steps, args.batch, args.data, args.out)
    return 0


def _bench_quality(args) -> int:
    from feathertune.quality import run_quality

    if args.data and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data}: no such file", source="bench quality")
    if args.validation and not Path(args.validation).is_file():
        raise ConfigError(f"--validation {args.validation}: no such file", source="bench quality")
    flags = [f for f, on in (("--quick", args.quick), (f"--data {args.data}", args.data),
                             (f"--validation {args.validation}", args.validation)) if on]
    run_quality(quick=args.quick, data=args.data, validation=args.validation, out=args.out, work=args.work,
                only=args.only, fresh=args.fresh, command=" ".join(["feathertune bench quality", *flags]))
    return 0


def _inspect(args) -> int:
    from feathertune.inspect import describe

    print(describe(Path(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
