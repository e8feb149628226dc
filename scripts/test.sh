#!/usr/bin/env bash
# Sets everything up, then lints (ruff) and runs the default test suite (CUDA tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check graphcap tests
exec .venv/bin/python -m pytest -q "$@"
