"""Peers on the identical weights: HF transformers `generate`, eager and (behind a flag) static cache +
`torch.compile`, in the engine's dtype. Random presets are exported to a temporary HF checkpoint, GGUF
files (the `smollm2` preset names one) are read by HF's own GGUF loader, which dequantises the same blocks
with the same `gguf` package, so both sides compute on the same tensors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from graphcap.bench.e2e import NEW_TOKENS, Contender
from graphcap.checkpoints.gguf import is_gguf_path
from graphcap.executor.loader import REAL_PRESETS
from graphcap.executor.presets import PRESETS, export_preset


def model_source(model: str) -> str:
    """Where a model's weights come from, for the report: a GGUF file or directory path, or the preset."""
    if model in PRESETS:
        return f"preset {model} (random weights, fixed seed)"
    if model in REAL_PRESETS:
        return str(REAL_PRESETS[model]())
    return str(Path(model).expanduser().resolve())


def gguf_file(model: str) -> Path | None:
    """The GGUF file behind a model name (a real preset or a .gguf path), else None."""
    if model in REAL_PRESETS:
        return REAL_PRESETS[model]()
    if model not in PRESETS and is_gguf_path(model):
        return Path(model).expanduser()
    return None


def _load_hf(model: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    gguf = gguf_file(model)
    if gguf is not None:
        # HF dequantises to float32 first; cast afterwards, as graphcap does.
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        return hf.to(dtype).eval()
    if model not in PRESETS:
        return AutoModelForCausalLM.from_pretrained(str(Path(model).expanduser()), dtype=dtype).eval()
    with tempfile.TemporaryDirectory(prefix="graphcap-bench-") as tmp:
        path = export_preset(model, Path(tmp) / model)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        # Own the tensors before the directory (and any file mapping behind them) goes away.
        for p in hf.parameters():
            p.data = p.data.clone()
        return hf


def hf_contenders(model: str, compile_too: bool, notes: list[str],
                  dtype: torch.dtype = torch.float32) -> list[Contender]:
    """HF peers, or none (with a note) when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        notes.append("HF transformers is not installed; peer rows skipped (pip install graphcap[bench])")
        return []
    hf = _load_hf(model, dtype)
    attn = getattr(hf.config, "_attn_implementation", "default")
    out = [Contender("peer", f"hf-{transformers.__version__}-eager({attn})", _generate_fn(hf, {}))]
    if compile_too:
        compiled = _load_hf(model, dtype)
        compiled.forward = torch.compile(compiled.forward, dynamic=False)
        out.append(Contender("peer", "hf-static-cache+compile", _generate_fn(compiled,
                                                                            {"cache_implementation": "static"})))
    return out


def _generate_fn(hf, extra: dict):
    """Greedy, exactly NEW_TOKENS per request, EOS generated like any token and ending nothing: what
    `ignore_eos` does on our side. (`min_new_tokens` would not do: it forbids EOS, so a request whose
    greedy token is EOS would continue with another token than ours.) The peer's own generation config
    loses its EOS ids (generate fills every unset option from it), so only the length ends a request."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0  # never used (no request ends early); generate wants one for a batch

    @torch.inference_mode()
    def generate(prompts: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.int64)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                          **extra)
        return out[:, ids.shape[1]:].tolist()

    return generate
