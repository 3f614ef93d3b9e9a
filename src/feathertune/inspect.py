"""`feathertune inspect`: what an adapter or run directory holds, without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from feathertune.file_layout import CONFIG_FILE, DESCRIPTIVE_KEYS, WEIGHTS_FILE
from feathertune.registry import spec_for_peft_type

# Shown on lines of their own, or not at all (the file's bookkeeping).
_OWN_LINES = {"target_modules", "modules_to_save", "rank_pattern", "alpha_pattern"}


def describe(path: Path) -> str:
    """A few lines: method, mergeable, key settings, trainable parameters, size (and the run's scores)."""
    run_dir = path if (path / "adapter").is_dir() else None
    adapter = path / "adapter" if run_dir else path
    if not (adapter / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} here or in {path / 'adapter'}")
    config = json.loads((adapter / CONFIG_FILE).read_text())
    weights = adapter / WEIGHTS_FILE
    count, tensors, dtypes = 0, 0, set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            numel = 1
            for size in piece.get_shape():
                numel *= size
            count += numel
            tensors += 1
            dtypes.add(piece.get_dtype())
    peft_type = config.get("peft_type", "?")
    spec = spec_for_peft_type(peft_type)
    method = f"{spec.name} ({peft_type})" if spec else f"{peft_type} (not a method feathertune loads)"
    method += " + DoRA" if config.get("use_dora") else ""
    method += " (rsLoRA scale)" if config.get("use_rslora") else ""
    mergeable = "" if spec is None else ("; mergeable" if spec.mergeable else "; not mergeable (stays attached)")
    settings = {k: v for k, v in config.items() if k not in DESCRIPTIVE_KEYS and k not in _OWN_LINES
                and v not in (None, False, {}, [], "")}
    targets = config.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    lines = [
        f"adapter:     {adapter}",
        f"method:      {method}{mergeable}",
        f"settings:    {', '.join(f'{k}={v}' for k, v in sorted(settings.items()))}" if settings else None,
        f"per-module:  ranks for {len(config['rank_pattern'])} modules" if config.get("rank_pattern") else None,
        f"targets:     {targets}" if targets else None,
        f"saved whole: {', '.join(config['modules_to_save'])}" if config.get("modules_to_save") else None,
        f"base model:  {config.get('base_model_name_or_path')}",
        f"trainable:   {count:,} parameters in {tensors} tensors ({', '.join(sorted(dtypes))})",
        f"file size:   {weights.stat().st_size / 2**20:.2f} MiB",
    ]
    if run_dir and (run_dir / "eval.json").is_file():
        scores = json.loads((run_dir / "eval.json").read_text())
        shown = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines.append("evaluation:  " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    return "\n".join(line for line in lines if line is not None)
