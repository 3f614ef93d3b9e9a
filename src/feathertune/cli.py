"""The `feathertune` command: train, eval, generate, chat, merge, inspect.

Every subcommand is a thin shell over the Python API; errors that feathertune raises on purpose
are printed as one clear message (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = "Run `feathertune COMMAND --help` for a command's options. Docs: README.md."


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from feathertune.errors import FeathertuneError

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
                       description="Fine-tune as CONFIG says; KEY=VALUE pairs override its keys "
                                   "(e.g. train.lr=1e-3 output=runs/try2). See README 'Configuration'.")
    p.add_argument("config", help="YAML config, e.g. recipes/e2e-lora.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config keys to override")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output directory")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="score a run's adapter (or the base) on a data file")
    p.add_argument("run", help="run directory (with config.yaml and adapter/) or adapter directory")
    p.add_argument("--data", help="data file (default: the run's validation file)")
    p.add_argument("--model", help="base model (default: from the run or the adapter)")
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

    p = sub.add_parser("merge", help="fold an adapter into the base and write a full model directory")
    p.add_argument("--adapter", required=True, help="adapter directory (or run directory)")
    p.add_argument("--out", required=True, help="where to write the merged model (transformers format)")
    p.add_argument("--model", help="base model (default: from the run or the adapter)")
    p.add_argument("--dequantize", action="store_true",
                   help="for a QLoRA run: merge into the full-precision base (the exact export) instead "
                        "of rounding the merged weights back to NF4")
    p.set_defaults(handler=_merge)

    p = sub.add_parser("inspect", help="what an adapter or run directory holds")
    p.add_argument("path", help="adapter directory or run directory")
    p.set_defaults(handler=_inspect)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: smollm2-135m-instruct, or the adapter's)")
    p.add_argument("--adapter", help="adapter or run directory to apply")


def _train(args) -> int:
    from feathertune.train.config import load_config
    from feathertune.train.loop import run

    config = load_config(args.config, args.overrides)
    run(config, resume=args.resume)
    return 0


def _resolve(path: str | None, model: str | None) -> tuple[str, Path | None, Path | None]:
    """(base model, adapter dir, run dir) from a run or adapter directory and an optional --model."""
    if path is None:
        return model or "smollm2-135m-instruct", None, None
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        from feathertune.train.config import load_config

        return model or load_config(path / "config.yaml").model, path / "adapter", path
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a run directory (config.yaml + adapter/) nor an adapter "
                                f"directory (adapter_config.json)")
    recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    run_config = path.parent / "config.yaml"
    if model is None and run_config.is_file():
        from feathertune.train.config import load_config

        recorded = load_config(run_config).model
    return model or recorded or "smollm2-135m-instruct", path, None


def _load(path: str | None, model_name: str | None, task: str = "causal_lm", full_precision: bool = False):
    """Base model (quantized as the run was, unless full_precision) with the adapter loaded."""
    import feathertune as ft
    from feathertune.models import load_model
    from feathertune.train.config import load_config

    name, adapter, run_dir = _resolve(path, model_name)
    run_config = (run_dir or (adapter.parent if adapter else None))
    quantize = None
    if run_config is not None and (run_config / "config.yaml").is_file() and not full_precision:
        quantize = load_config(run_config / "config.yaml").quantization
    model, tokenizer = load_model(name, task=task, quantize=quantize)
    if adapter is not None:
        ft.load_adapter(model, adapter)
    return model, tokenizer, run_dir


def _generate(args) -> int:
    from feathertune import evaluate

    model, tokenizer, _ = _load(args.adapter, args.model)
    answers = evaluate.generate(model, tokenizer, [[{"role": "user", "content": p}] for p in args.prompts],
                                max_new_tokens=args.max_new_tokens, progress=False)
    for prompt, answer in zip(args.prompts, answers):
        print(f"> {prompt}\n{answer}\n")
    return 0


def _chat(args) -> int:
    from feathertune import evaluate

    model, tokenizer, _ = _load(args.adapter, args.model)
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
    from feathertune.train.config import load_config
    from feathertune.train.report import evaluate_run

    name, adapter, run_dir = _resolve(args.run, args.model)
    config = load_config(run_dir / "config.yaml") if run_dir else None
    results = evaluate_run(name, adapter, data=args.data, config=config)
    print(json.dumps(results, indent=2))
    return 0


def _merge(args) -> int:
    import feathertune as ft

    model, tokenizer, _ = _load(args.adapter, args.model, full_precision=args.dequantize)
    merged = ft.merge(model)
    out = Path(args.out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (load it with transformers' from_pretrained)")
    return 0


def _inspect(args) -> int:
    from feathertune.inspect import describe

    print(describe(Path(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
