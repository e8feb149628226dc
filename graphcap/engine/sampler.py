"""Token selection from logits: greedy in one vectorised argmax, sampled rows with their own settings."""

from __future__ import annotations

import torch

from graphcap.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [B, V] -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i].float(), p, generators[i])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    # Shift by the max and divide in float64: softmax is unchanged, but a tiny temperature can no longer
    # overflow fp32 to inf (inf - inf = NaN) or be rounded to 0 (0 / 0 = NaN). The shift itself is done in
    # float64 too: in fp32, 1.0 - 3e-15 rounds to 1.0 and would tie distinct logits at the top-k cut.
    logits = logits.double()
    logits = (logits - logits.max()) / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(0)
        drop = cum - sorted_probs >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
