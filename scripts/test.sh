#!/usr/bin/env bash
# Installs the project (scripts/setup.sh) and runs the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
