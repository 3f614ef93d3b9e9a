#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k dora`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -m "not slow" "$@"
