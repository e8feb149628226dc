#!/usr/bin/env bash
# Sets everything up, then runs the main job: the benchmark on the built-in `tiny` model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/graphcap bench --model tiny "$@"
