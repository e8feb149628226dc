"""Peers on the identical weights: HF transformers `generate`, eager and (behind a flag) static cache +
`torch.compile`. Presets are exported to a temporary HF checkpoint so both sides read the same tensors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from graphcap.bench.e2e import NEW_TOKENS, Contender
from graphcap.executor.presets import PRESETS, export_preset


def _load_hf(model: str):
    from transformers import AutoModelForCausalLM

    if model not in PRESETS:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="graphcap-bench-") as tmp:
        path = export_preset(model, Path(tmp) / model)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        # Own the tensors before the directory (and any file mapping behind them) goes away.
        for p in hf.parameters():
            p.data = p.data.clone()
        return hf


def hf_contenders(model: str, compile_too: bool, notes: list[str]) -> list[Contender]:
    """HF peers, or none (with a note) when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        notes.append("HF transformers is not installed; peer rows skipped (pip install graphcap[bench])")
        return []
    hf = _load_hf(model)
    attn = getattr(hf.config, "_attn_implementation", "default")
    out = [Contender("peer", f"hf-{transformers.__version__}-eager({attn})", _generate_fn(hf, {}))]
    if compile_too:
        compiled = _load_hf(model)
        compiled.forward = torch.compile(compiled.forward, dynamic=False)
        out.append(Contender("peer", "hf-static-cache+compile", _generate_fn(compiled,
                                                                            {"cache_implementation": "static"})))
    return out


def _generate_fn(hf, extra: dict):
    """Greedy, exactly NEW_TOKENS per request: `min_new_tokens` keeps EOS from ending a request early."""

    @torch.inference_mode()
    def generate(prompts: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.int64)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:].tolist()

    return generate
