#!/usr/bin/env bash
# The first command of the README: set everything up, then run the main job.
# (Until the training pipeline lands, the main job is examples/quickstart.py: attach LoRA, train,
# save in PEFT format, load, merge, and show that the loss fell and the merged model agrees.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/quickstart.py
