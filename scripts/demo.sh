#!/usr/bin/env bash
# The README's first command: set everything up, then run the main job — fine-tune the embedded
# SmolLM2-135M-Instruct with LoRA on E2E NLG and show base vs fine-tuned (BLEU, three answers).
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=40`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/feathertune train recipes/e2e-lora.yaml "output=runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
