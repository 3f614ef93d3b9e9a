#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dora`, `-m slow` (CI's end-to-end tier)
# or `-m extended` (the headline recipes as shipped and the rest of the E2E runs, about an hour).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -m "not slow and not extended" "$@"
