"""llama.cpp as the CPU peer (`graphcap bench --peer llamacpp`): the same GGUF file, the same prompt, the same
thread count, timed in turns with graphcap's engine so that machine noise lands on both alike.

Two figures per thread count, the ones a CPU user compares:
* batch 1 ms per generated token: (time of a 1 + N token reply - time of a 1 token reply) / N, so the
  prompt's prefill cancels out;
* aggregate tokens/s of 16 requests of N tokens: graphcap batches them; llama-cpp-python's `Llama` runs one
  sequence at a time, so its 16 run back to back (what a user of it gets).
`llama-cpp-python` is an optional extra (it builds llama.cpp from source); without it the rows are skipped
with a note.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

from graphcap.bench.report import Row, make_row

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
          "and tell it slowly.")
NEW_TOKENS = 64
CONCURRENT = 16


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppPeer:
    """One `llama_cpp.Llama` per thread count on the GGUF file (a context holds its thread count)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._models: dict[int, object] = {}

    def model(self, threads: int):
        if threads not in self._models:
            from llama_cpp import Llama

            self._models[threads] = Llama(model_path=str(self.path), n_ctx=512, n_threads=threads,
                                          n_threads_batch=threads, n_batch=512, verbose=False, seed=0)
        return self._models[threads]

    def reply_seconds(self, threads: int, prompt_ids: list[int], new_tokens: int) -> tuple[float, int]:
        """Seconds for one greedy reply of up to `new_tokens`, and how many tokens it had."""
        llm = self.model(threads)
        llm.reset()  # no prefix reuse between turns: each reply pays its prefill, as graphcap's does
        t0 = time.perf_counter()
        out = llm.create_completion(prompt_ids, max_tokens=new_tokens, temperature=0.0, top_k=1)
        return time.perf_counter() - t0, int(out["usage"]["completion_tokens"])


def _graphcap_reply_seconds(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    from graphcap import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)


def peer_rows(llm, gguf: Path | None, mode: str, threads: list[int], iters: int, notes: list[str]) -> list[Row]:
    """graphcap's `llm` (in graph mode `mode`) against llama.cpp on `gguf`, at each thread count."""
    if gguf is None:
        notes.append("--peer llamacpp: the model is not a GGUF file, so llama.cpp cannot load the same weights")
        return []
    if not available():
        notes.append("--peer llamacpp: llama-cpp-python is not installed (pip install -e '.[llamacpp]', "
                     "a source build of about 8 minutes); no llama.cpp rows")
        return []
    peer = LlamaCppPeer(gguf)
    prompt = llm.tokenizer.encode(PROMPT) if llm.tokenizer is not None else list(range(10, 40))
    saved = torch.get_num_threads()
    rows: list[Row] = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            ours = {"b1_short": [], "b1_long": [], "agg": []}
            theirs = {"b1_short": [], "b1_long": [], "agg": []}
            tokens = {"ours": 0, "theirs": 0}
            for i in range(iters + 1):  # the first round warms both up and is not counted
                s1, _ = _graphcap_reply_seconds(llm, [prompt], 1)
                sn, _ = _graphcap_reply_seconds(llm, [prompt], NEW_TOKENS + 1)
                sa, na = _graphcap_reply_seconds(llm, [prompt] * CONCURRENT, NEW_TOKENS)
                p1, _ = peer.reply_seconds(t, prompt, 1)
                pn, pn_tokens = peer.reply_seconds(t, prompt, NEW_TOKENS + 1)
                pa = [peer.reply_seconds(t, prompt, NEW_TOKENS) for _ in range(CONCURRENT)]
                if i == 0:
                    continue
                ours["b1_short"].append(s1), ours["b1_long"].append(sn), ours["agg"].append(na / sa)
                theirs["b1_short"].append(p1), theirs["b1_long"].append(pn)
                theirs["agg"].append(sum(n for _, n in pa) / sum(s for s, _ in pa))
                tokens["theirs"] = pn_tokens
            ms_ours = (statistics.median(ours["b1_long"]) - statistics.median(ours["b1_short"])) / NEW_TOKENS * 1e3
            steps = max(1, tokens["theirs"] - 1)
            ms_theirs = (statistics.median(theirs["b1_long"]) - statistics.median(theirs["b1_short"])) / steps * 1e3
            agg_ours, agg_theirs = statistics.median(ours["agg"]), statistics.median(theirs["agg"])
            rows.append(make_row("llamacpp", f"batch 1 ({mode})", 1, None, threads=t, unit="ms/token",
                                 graphcap=round(ms_ours, 2), llamacpp=round(ms_theirs, 2),
                                 speedup_vs_peer=round(ms_theirs / ms_ours, 2)))
            rows.append(make_row("llamacpp", f"{CONCURRENT} requests x {NEW_TOKENS} ({mode})", CONCURRENT, None,
                                 threads=t, unit="tokens/s", graphcap=round(agg_ours, 1),
                                 llamacpp=round(agg_theirs, 1), speedup_vs_peer=round(agg_ours / agg_theirs, 2)))
            if tokens["theirs"] - 1 < NEW_TOKENS:
                notes.append(f"llama.cpp stopped its reply at {tokens['theirs']} tokens (EOS); its ms/token "
                             "divides by the tokens it made")
    finally:
        torch.set_num_threads(saved)
    return rows
