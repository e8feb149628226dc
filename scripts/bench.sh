#!/usr/bin/env bash
# Sets everything up, then runs the main job: `graphcap bench` on the real `smollm2` model (SmolLM2-135M-Instruct,
# the model the project is judged on) with the built-in `tiny` beside it, as two runs, one process each (startup,
# peak RSS and the load average stay per model). Both use the engine's default buckets and modes; smollm2 takes
# fewer timing turns, since its steps are 10-100x tiny's (a 1x128 prefill step is ~0.4 s on one fp32 thread).
#
# Extra arguments go to both runs, after ours, so they win (e.g. --threads 2, --dtype bfloat16, --iters 10).
# `--json PATH` writes {"runs": [<tiny>, <smollm2>]} to PATH, each element the JSON of one `graphcap bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

json=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json="${2:?--json needs a path}"; shift 2 ;;
    --json=*) json="${1#--json=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

run() {  # run NAME [bench flags...]: one `graphcap bench`, its JSON (when asked for) to $tmp/NAME.json
  local name="$1"; shift
  echo "== graphcap bench --model $name $* ${args[*]:-}" >&2
  .venv/bin/graphcap bench --model "$name" "$@" ${json:+--json "$tmp/$name.json"} ${args[@]+"${args[@]}"}
}

run tiny
echo
run smollm2 --iters 4 --steps-per-turn 2 --e2e-iters 1 --peer llamacpp  # llama.cpp rows where the optional extra is installed
echo
# Real text from the real model (eager: the bench above measured its graphs; this only shows what it says).
echo "== graphcap chat --model smollm2 --message 'What is the capital of France? Answer in one sentence.'" >&2
.venv/bin/graphcap chat --model smollm2 --graph-decode eager --graph-prefill eager --max-new-tokens 48 \
  --message "What is the capital of France? Answer in one sentence."

if [ -n "$json" ]; then
  .venv/bin/python - "$json" "$tmp/tiny.json" "$tmp/smollm2.json" <<'EOF'
import json, sys
from pathlib import Path
out, *runs = sys.argv[1:]
Path(out).write_text(json.dumps({"runs": [json.loads(Path(r).read_text()) for r in runs]}, indent=2) + "\n")
EOF
fi
