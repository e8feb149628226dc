"""bfloat16 and float16 weights on CPU end to end: eager (with graphcap's C++ attention kernels and with torch's
attention), full-graph decode and breakable prefill on the tiny preset, against a float32 engine on the same
weights (graphcap.bench.accuracy: the float32 greedy tokens fed to both, so every logits row compares the
two precisions on identical inputs).

Tolerance: max |logits - fp32| / max |fp32 logits| <= 8 x the dtype's machine epsilon (bf16 2^-7: 6.3%,
fp16 2^-10: 0.78%). Measured here (4 prompts, 12 tokens): bf16 1.3% (eager and graphs) = 1.7 eps, fp16
0.16-0.17% = 1.7 eps: the error scales with the dtype's epsilon, as rounding does. On the real smollm2 (30
layers, text prompts, 32 tokens) bf16 5.2% = 6.7 eps and fp16 0.49% = 5.0 eps (HF transformers in the same
dtypes: 4.2% / 0.49%), so one rule, 8 eps, holds for both models. A real fault (a weight or cache in the
wrong dtype, a lost layer, a wrong rotary table) moves logits by their own order of magnitude, past 8 eps.

Greedy tokens must be identical wherever the margin allows: while float32's top-two gap exceeds twice the
error, rounding cannot flip the argmax, so the free-running greedy generation must match float32's up to the
first near-tie. The error is the one measured on the same prompts (teacher-forced, one request), doubled
for the free run's different batch shapes. Tiny's logits are small (max 0.66) and its top-two gaps too
(about 0.01, like bf16's error of 0.008): in bf16 the first near-tie comes at once and the token check
binds little; in fp16 (error 0.001) it holds three of the four requests to their first 1-6 tokens (all
12 tokens of all four match).
"""

from __future__ import annotations

import pytest
import torch

from graphcap import LLM
from graphcap.bench.accuracy import accuracy_prompts, compare_dtypes, reference

# One full-decode compile per dtype: about 75 s in all on a 2-core machine with an empty Inductor cache
# (35 s per dtype), 10 s once Inductor's on-disk cache holds the kernels.
pytestmark = pytest.mark.slow

NEW_TOKENS = 12
ENGINE = dict(kv_cache_tokens=1024, use_cache=False)
GRAPHS = dict(graph_decode="full", graph_prefill="breakable", decode_sizes=[4], prefill_sizes=[32, 64],
              max_prefill_tokens=64, graph_select="always")


def _tolerance(dtype: str) -> float:
    return 8 * torch.finfo(getattr(torch, dtype)).eps


@pytest.fixture(scope="module")
def fp32():
    llm = LLM("tiny", dtype="float32", graph_decode="eager", graph_prefill="eager", **ENGINE)
    prompts = accuracy_prompts(llm)
    ref = reference(llm, prompts, NEW_TOKENS)
    yield ref
    llm.shutdown()


def _near_tie_step(ref, prompt_index: int, error: float) -> int:
    """The first generated position whose float32 top-two margin is within 2 x error (or NEW_TOKENS)."""
    t = ref.traces[prompt_index]
    top2 = t.logits[t.prompt_rows - 1:].topk(2, dim=-1).values  # row k predicts generated token k
    close = ((top2[:, 0] - top2[:, 1]) <= 2 * error).nonzero().flatten().tolist()
    return close[0] if close else NEW_TOKENS


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_matches_float32_eager_and_graphs(fp32, dtype) -> None:
    tol = _tolerance(dtype)
    eager = dict(graph_decode="eager", graph_prefill="eager")
    engines = {"eager": LLM("tiny", dtype=dtype, **eager, **ENGINE),  # C++ attention kernels where built
               "eager-torch-attention": LLM("tiny", dtype=dtype, cpu_kernels=False, **eager, **ENGINE),
               "graphs": LLM("tiny", dtype=dtype, **GRAPHS, **ENGINE)}
    try:
        graphs = engines["graphs"].stats()
        assert graphs["decode"]["captured"] == [4] and graphs["prefill"]["captured"] == [32, 64]
        assert engines["eager-torch-attention"].stats()["attention_kernel"] == "torch"
        for name, llm in engines.items():
            assert next(llm.runner.model.parameters()).dtype == getattr(torch, dtype)
            acc = compare_dtypes(fp32, llm, graphs=name == "graphs", mode=name)
            assert 0 < acc.rel_err <= tol, (name, acc)  # > 0: it really ran in reduced precision
            if name == "graphs":
                # every decode step and the prompts that fit a prefill bucket replayed a graph
                assert acc.graph_steps >= acc.prompts * (NEW_TOKENS - 1), acc
                stats = llm.stats()
                assert stats["decode"]["replays"] > 0 and stats["prefill"]["replays"] > 0, stats
            for i, same in enumerate(acc.free_run_prefix):
                assert same >= _near_tie_step(fp32, i, 2 * acc.max_abs_diff), (name, i, acc)
    finally:
        for llm in engines.values():
            llm.shutdown()
