"""Encoder bench rows: eager versus `full` graphs per (batch, sequence length), timed side by side.

Each bucket is captured once (verified against eager, `select="always"` so every bucket is timed even where
the graph loses), then the graph replay and the eager forward of the same full-length batch are timed
alternately (`interleaved_medians`), so machine noise hits both alike and the speedup is a ratio from one run.
"""

from __future__ import annotations

import torch

from graphcap.executor.encoder_loader import load_encoder
from graphcap.graph.config import EncoderGraphConfig
from graphcap.graph.runners.encoder import EncoderGraphRunner
from graphcap.graph.verify import interleaved_medians


def encoder_rows(
    model: str,
    batch_sizes: tuple[int, ...] | list[int] = (1, 8, 32),
    seq_lens: tuple[int, ...] | list[int] = (16, 128),
    iters: int = 10,
    device: str = "cpu",
    mode: str = "full",
) -> list[dict]:
    """Two rows per (batch, seq): mode="eager" and the graph mode, with `speedup_vs_eager` = eager / graph.
    `max_abs_diff` is graph versus eager on the timed batch; `tokens_equal` is None (encoders emit no tokens).
    Image encoders have one sequence length (their token count), so `seq_lens` is ignored for them."""
    loaded = load_encoder(model, device=device)
    cfg = EncoderGraphConfig(mode=mode, batch_sizes=tuple(batch_sizes), seq_lens=tuple(seq_lens),
                             select="always", verify="warn")
    runner = EncoderGraphRunner(loaded.model, cfg, torch.device(device), loaded.max_length)
    runner.capture()
    rows: list[dict] = []
    with torch.inference_mode():
        for bs, seq in runner.buckets:
            inputs = runner.random_inputs(bs, seq, full=True)
            reason = runner.can_run(bs, seq)
            base = dict(phase="encoder", batch_size=bs, seq_len=seq, tokens_equal=None)
            if reason is not None:  # rejected at capture (differs from eager, or capture failed)
                eager_ms, _ = interleaved_medians(lambda: loaded.model.embed(*inputs), lambda: None, iters)
                rows.append({**base, "mode": "eager", "ms_median": eager_ms, "speedup_vs_eager": 1.0,
                             "max_abs_diff": 0.0})
                rows.append({**base, "mode": mode, "ms_median": None, "speedup_vs_eager": None,
                             "max_abs_diff": None, "reason": reason})
                continue
            graph_ms, eager_ms = interleaved_medians(
                lambda: runner.run(*inputs), lambda: loaded.model.embed(*inputs), iters
            )
            diff = float((runner.run(*inputs) - loaded.model.embed(*inputs)).abs().max())
            rows.append({**base, "mode": "eager", "ms_median": eager_ms, "speedup_vs_eager": 1.0,
                         "max_abs_diff": 0.0})
            rows.append({**base, "mode": mode, "ms_median": graph_ms, "speedup_vs_eager": eager_ms / graph_ms,
                         "max_abs_diff": diff})
    return rows


def render_encoder_rows(rows: list[dict]) -> str:
    """A markdown table of `encoder_rows` output."""
    lines = ["| mode | batch | seq | ms (median) | speedup vs eager | max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = "-" if r["ms_median"] is None else f"{r['ms_median']:.2f}"
        sp = f"- ({r.get('reason')})" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['seq_len']} | {ms} | {sp} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m graphcap.bench.encoder [MODEL]
    import sys

    print(render_encoder_rows(encoder_rows(sys.argv[1] if len(sys.argv) > 1 else "minilm")))
