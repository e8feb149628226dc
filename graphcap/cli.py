"""The `graphcap` command line: `generate` and `bench`. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from graphcap.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that builds an engine. Defaults are None so that only flags the
    user gave override `--graph-config`; the engine's own defaults apply otherwise."""
    p.add_argument("--model", required=True, help="HF checkpoint directory or preset name (tiny, small)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--tp", type=int, default=None, dest="tp_size", help="tensor-parallel ranks")
    p.add_argument("--graph-decode", default=None, help="eager (default) or full")
    p.add_argument("--graph-prefill", default=None, help="eager (default)")
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--max-prefill-tokens", type=int, default=None)
    p.add_argument("--decode-sizes", type=_int_list, default=None, help="decode batch buckets, e.g. 1,2,4,8")
    p.add_argument("--graph-select", default=None, choices=["auto", "always"],
                   help="auto: keep a bucket's graph only where it beats eager at capture")
    p.add_argument("--graph-verify", default=None, choices=["warn", "strict", "off"])
    p.add_argument("--graph-config", default=None, help="JSON file of engine/graph options")


def engine_kwargs(args: argparse.Namespace) -> dict:
    from graphcap.config import load_json_config

    kwargs = {}
    if args.graph_config:
        kwargs.update(load_json_config(args.graph_config))
    given = {
        "device": args.device, "dtype": args.dtype, "tp_size": args.tp_size, "graph_decode": args.graph_decode,
        "graph_prefill": args.graph_prefill, "kv_cache_tokens": args.kv_cache_tokens,
        "kv_cache_memory_fraction": args.kv_cache_memory_fraction,
        "max_running_requests": args.max_running_requests, "max_prefill_tokens": args.max_prefill_tokens,
        "decode_sizes": args.decode_sizes, "graph_select": args.graph_select, "graph_verify": args.graph_verify,
    }
    kwargs.update({k: v for k, v in given.items() if v is not None})
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from graphcap import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    with LLM(args.model, **engine_kwargs(args)) as llm:
        if args.prompt is not None:
            outs = llm.generate(prompts=[args.prompt], sampling_params=params)
        else:
            outs = llm.generate(prompt_token_ids=[args.prompt_ids], sampling_params=params)
        out = outs[0]
        if args.json:
            print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                              "stats": llm.stats()}))
        else:
            print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphcap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from one prompt")
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs a tokenizer.json in the checkpoint)")
    src.add_argument("--prompt-ids", type=_int_list, help="comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="graphcap: %(message)s")
    try:
        return args.func(args)
    except UserError as e:
        print(f"graphcap: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
