"""One engine start and a fixed workload, run in a fresh process by tests/graph/test_graph_cache.py (a warm start
must be judged where nothing of the cold one lives on in memory).

    python cache_workload.py MODEL CACHE_DIR OUT_DIR [JSON_ENGINE_OPTIONS]

writes OUT_DIR/result.json (greedy tokens and the engine's stats) and OUT_DIR/logits.safetensors (the logits of
a decode and a prefill batch, both served by graphs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from graphcap import LLM, SamplingParams
from graphcap.graph.probe import ProbeBatches

# Every bucket a graph (no timing noise in what is cached): decode 2 and 4 share one compile, prefill 16 and
# 32 the three segment compiles.
ENGINE = dict(decode_sizes=[2, 4], prefill_sizes=[16], max_prefill_tokens=32, max_running_requests=4,
              kv_cache_tokens=1024, graph_select="always", threads=1)
PROMPTS = [[5, 9, 200, 31], [7, 7, 3, 12, 40, 41, 42, 43, 44, 45, 46], [100 + i for i in range(20)]]


def run(model: str, cache_dir: str, options: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    with LLM(model, cache_dir=cache_dir, **{**ENGINE, **options}) as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS,
                            sampling_params=SamplingParams(max_new_tokens=8, ignore_eos=True))
        probes = ProbeBatches(llm.runner, seed=7)
        try:
            logits = {"decode": llm.runner.forward(probes.decode(3, max_context=40)),
                      "prefill": llm.runner.forward(probes.prefill([9, 12], [0, 4]))}
        finally:
            probes.release()
        return {"tokens": [o.token_ids for o in outs], "stats": llm.stats()}, logits


if __name__ == "__main__":
    model, cache_dir, out = sys.argv[1:4]
    result, logits = run(model, cache_dir, json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "result.json").write_text(json.dumps(result, default=str))
    save_file({k: v.contiguous() for k, v in logits.items()}, str(Path(out) / "logits.safetensors"))
