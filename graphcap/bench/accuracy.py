"""Accuracy of a reduced-precision engine (bfloat16, float16) against float32 on the same weights.

Both engines run eagerly on identical inputs: each prompt is prefilled (logits of every prompt position),
then the float32 engine's greedy continuation is fed one decode step at a time to both (teacher forcing),
so every logits row compares the two precisions on the same tokens; a free-running greedy generation in
each precision then says how long their outputs stay identical.

The error is relative to the logits' scale, max |logits - fp32 logits| / max |fp32 logits|, over every
compared row: a real model's logits span tens of units where a random one's span a few, so an absolute
bound would mean different things on each. Where the greedy tokens differ, the float32 margin between its
top two logits is reported: a disagreement on a near-tie is rounding, one on a wide margin is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphcap.batch.forward_batch import ForwardMode
from graphcap.models.config import parse_dtype

SEED = 11
# Fixed texts for a model with a tokenizer (the real checkpoint): natural prompts of 20-40 tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. In the next paragraph we explain why this sentence is used "
    "by typographers to show every letter of the alphabet.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make",
    "Question: What is the capital of France, and what river runs through it?\nAnswer:",
]
RANDOM_PROMPT_LENS = [7, 19, 32, 48]


@dataclass
class Trace:
    """Float32 logits of every compared position: prompt positions, then one row per decode step."""

    logits: torch.Tensor  # [rows, vocab]
    prompt_rows: int
    continuation: list[int]


@dataclass
class Reference:
    """The float32 engine's traces (greedy continuation) and free-running greedy outputs of some prompts."""

    prompts: list[list[int]]
    traces: list[Trace]
    free_run: list[list[int]]
    new_tokens: int

    @property
    def scale(self) -> float:
        return max(float(t.logits.abs().max()) for t in self.traces)


@dataclass
class DtypeAccuracy:
    dtype: str
    mode: str  # "eager", or the graph mode whose dispatch the steps went through
    rel_err: float  # max |logits - fp32| / max |fp32|, all rows
    prefill_rel_err: float
    decode_rel_err: float
    max_abs_diff: float
    rows: int
    argmax_agree: int  # rows whose argmax equals fp32's (teacher-forced: same inputs)
    disagree_margins: list[float] = field(default_factory=list)  # fp32 top1-top2 gap where they differ
    free_run_equal: int = 0  # prompts whose free-running greedy generation is identical to fp32's
    free_run_prefix: list[int] = field(default_factory=list)  # identical leading tokens per prompt
    prompts: int = 0
    new_tokens: int = 0
    graph_steps: int = 0  # of the compared steps, how many replayed a graph (the rest ran eagerly)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def accuracy_prompts(llm, n: int = 4) -> list[list[int]]:
    """Real text when the model has a tokenizer, else random token ids of fixed lengths (seeded)."""
    if llm.tokenizer is not None:
        return [llm.tokenizer.encode(t) for t in TEXTS[:n]]
    gen = torch.Generator().manual_seed(SEED)
    vocab = llm.model_config.vocab_size
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in RANDOM_PROMPT_LENS[:n]]


@torch.inference_mode()
def trace(llm, prompt: list[int], new_tokens: int, continuation: list[int] | None = None,
          graphs: bool = False) -> Trace:
    """Logits of every prompt position, then of each decode step feeding `continuation` (or, when None,
    this engine's own greedy tokens). Eager by default; with `graphs`, every step goes through the
    engine's dispatch (`ModelRunner.forward`: its graph where one fits) and the prefill yields only the last
    prompt position, as in serving. Pages come from the engine's pool and go back zeroed."""
    mr = llm.runner
    step_fn = mr.forward if graphs else mr.forward_eager
    pool = mr.pool
    pages = pool.alloc(pool.pages_for(len(prompt) + new_tokens))
    if pages is None:
        raise RuntimeError("KV cache too small for the accuracy probe")
    try:
        batch = mr.make_batch(ForwardMode.PREFILL, [prompt], [0], [pages])
        if not graphs:
            batch.select = torch.arange(len(prompt), device=batch.input_ids.device)
        rows = [step_fn(batch).float()]
        tokens: list[int] = []
        for step in range(new_tokens):
            tok = int(rows[-1][-1].argmax()) if continuation is None else continuation[step]
            tokens.append(tok)
            if step == new_tokens - 1:
                break
            batch = mr.make_batch(ForwardMode.DECODE, [[tok]], [len(prompt) + step], [pages])
            rows.append(step_fn(batch).float())
        return Trace(torch.cat(rows).cpu(), rows[0].shape[0], tokens)
    finally:
        slots = (torch.tensor(pages).unsqueeze(-1) * mr.page_size + torch.arange(mr.page_size)).reshape(-1)
        for cache in mr.kv_cache.k + mr.kv_cache.v:
            cache.index_fill_(0, slots.to(cache.device), 0)
        pool.free(pages)


def _greedy(llm, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from graphcap import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference(ref_llm, prompts: list[list[int]], new_tokens: int = 32) -> Reference:
    """The float32 side, computed once for every engine compared against it."""
    return Reference(prompts, [trace(ref_llm, p, new_tokens) for p in prompts], _greedy(ref_llm, prompts, new_tokens),
                     new_tokens)


def _replays(llm) -> int:
    stats = llm.stats()
    return sum((stats.get(phase) or {}).get("replays", 0) for phase in ("decode", "prefill"))


def compare_dtypes(ref: Reference, llm, graphs: bool = False, mode: str = "eager") -> DtypeAccuracy:
    """`llm` (reduced precision) against the float32 reference on the same prompts, as the module says;
    with `graphs`, through the engine's graph dispatch (see `trace`)."""
    replays0 = _replays(llm)
    outs = [trace(llm, p, ref.new_tokens, r.continuation, graphs) for p, r in zip(ref.prompts, ref.traces)]
    free = _greedy(llm, ref.prompts, ref.new_tokens)
    graph_steps = _replays(llm) - replays0
    pre_rows, dec_rows, agree, margins, rows = [], [], 0, [], 0
    for o, r in zip(outs, ref.traces):
        base = r.logits[r.prompt_rows - o.prompt_rows:]  # a graph trace has only the last prompt row
        diff = (o.logits - base).abs().amax(-1)
        pre_rows.append(diff[: o.prompt_rows])
        dec_rows.append(diff[o.prompt_rows:])
        top2 = base.topk(2, dim=-1).values
        same = o.logits.argmax(-1) == base.argmax(-1)
        agree += int(same.sum())
        rows += same.numel()
        margins += [round(float(top2[i, 0] - top2[i, 1]), 4) for i in (~same).nonzero().flatten().tolist()]
    decode_diffs = torch.cat(dec_rows)
    prefill = float(torch.cat(pre_rows).max())
    decode = float(decode_diffs.max()) if decode_diffs.numel() else 0.0
    prefixes = [_common_prefix(a, b) for a, b in zip(ref.free_run, free)]
    scale, worst = ref.scale, max(prefill, decode)
    return DtypeAccuracy(
        dtype=str(parse_dtype(llm.config.dtype)).removeprefix("torch."), mode=mode, rel_err=worst / scale,
        prefill_rel_err=prefill / scale, decode_rel_err=decode / scale, max_abs_diff=worst, rows=rows, argmax_agree=agree,
        disagree_margins=sorted(margins), free_run_equal=sum(p == ref.new_tokens for p in prefixes),
        free_run_prefix=prefixes, prompts=len(ref.prompts), new_tokens=ref.new_tokens, graph_steps=graph_steps,
    )
