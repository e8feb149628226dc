"""The `graphcap` command line: `generate`, `chat`, `embed`, `bench`, `serve` and `bench serve`. User mistakes print
one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _json_arg(text: str) -> dict:
    return {"__json_or_path__": text}


# How a field's annotation becomes an argparse type.
_ARG_TYPES = {"str": str, "int": _int, "float": _float, "list[int]": _int_list, "dict": _json_arg}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with its help, generated so that every option is a flag. Defaults are
    None so that only flags the user gave override `--graph-config`; the engine's own defaults apply otherwise."""
    from graphcap.config import EngineConfig

    p.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file, or preset (tiny, small, "
                                                  "smollm2)")
    p.add_argument("--graph-config", default=None, help="JSON file of engine/graph options")
    for f in dataclasses.fields(EngineConfig):
        if f.name in ("model", "extra"):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.type == "bool":  # a flag that flips the default
            p.add_argument(flag, action="store_const", const=not f.default, default=None, dest=f.name,
                           help=helptext)
            continue
        kind = f.type.split(" | ")[0]
        p.add_argument(flag, type=_ARG_TYPES[kind], default=None, dest=f.name, help=helptext,
                       metavar="JSON_OR_PATH" if kind == "dict" else None)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _json_or_path(text: str | None, flag: str) -> dict | None:
    """A JSON object given inline (it starts with "{") or as a file path."""
    if text is None:
        return None
    from graphcap.common.json_file import parse_json_object
    from graphcap.config import load_json_config

    if not text.lstrip().startswith("{"):
        return load_json_config(text)
    return parse_json_object(text, flag)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options the user gave: `--graph-config` first, then every flag given on the command line."""
    from graphcap.config import EngineConfig, load_json_config

    kwargs = {}
    if args.graph_config:
        kwargs.update(load_json_config(args.graph_config))
    for f in dataclasses.fields(EngineConfig):
        value = getattr(args, f.name, None)
        if value is None or f.name in ("model", "extra"):
            continue
        if isinstance(value, dict) and "__json_or_path__" in value:
            value = _json_or_path(value["__json_or_path__"], f.metadata.get("flag") or "--" + f.name.replace("_", "-"))
        kwargs[f.name] = value
    return kwargs


def _sampling_params(args: argparse.Namespace):
    from graphcap import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    from graphcap import LLM

    params = _sampling_params(args)
    with LLM(args.model, **engine_kwargs(args)) as llm:
        if args.prompt is not None:
            outs = llm.generate(prompts=[args.prompt], sampling_params=params)
        else:
            outs = llm.generate(prompt_token_ids=[args.prompt_ids], sampling_params=params)
        return _print_output(llm, outs[0], args.json)


def cmd_chat(args: argparse.Namespace) -> int:
    from graphcap import LLM

    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": args.message})
    with LLM(args.model, **engine_kwargs(args)) as llm:
        return _print_output(llm, llm.chat(messages, _sampling_params(args))[0], args.json)


def _print_output(llm, out, as_json: bool) -> int:
    if not llm.is_driver:  # another rank of a torchrun launch: rank 0 prints the same result
        return 0
    if as_json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                          "stats": llm.stats()}))
    else:
        print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0


# The bench times its rows at one thread unless told otherwise: on a shared 2-core machine a second thread
# stalls every parallel region whenever the other core is busy, and ratios need a stable baseline.
BENCH_THREADS = 1


def cmd_bench(args: argparse.Namespace) -> int:
    from graphcap.bench.report import render, write_json
    from graphcap.bench.runner import BenchOptions, run_bench
    from graphcap.config import EngineConfig

    kwargs = engine_kwargs(args)
    opts = BenchOptions(
        model=args.model, engine_kwargs=kwargs, graph_decode=(args.graph_decode or "full").split(","),
        graph_prefill=(args.graph_prefill or "breakable").split(","), batch_sizes=args.batch_sizes, iters=args.iters,
        steps_per_turn=args.steps_per_turn, e2e_iters=args.e2e_iters, hf=not args.no_hf, hf_compile=args.hf_compile,
        allreduce=args.allreduce, threads=args.threads or BENCH_THREADS, peers=args.peer,
        peer_threads=args.peer_threads or sorted({1, EngineConfig(model=args.model).intra_op_threads()}),
    )
    result = run_bench(opts)
    if args.kernels:
        from graphcap.bench.kernels import decode_step_rows, gemm_crossover_rows, kernel_rows

        result["results"] += kernel_rows() + decode_step_rows() + gemm_crossover_rows()
    if args.encoder:
        from graphcap.bench.encoder import encoder_rows

        result["results"] += encoder_rows(args.encoder, iters=args.iters, device=args.device or "cpu")
    print(render(result))
    if args.json:
        write_json(result, args.json)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from graphcap import LLM
    from graphcap.engine.embedder import require_encoder_checkpoint

    require_encoder_checkpoint(args.model)  # before building anything: a decoder has no embed()
    kwargs = {}
    if args.graph_config:
        from graphcap.config import load_json_config

        kwargs.update(load_json_config(args.graph_config))
    kwargs.update(device=args.device, dtype=args.dtype, graph_encoder=args.graph_encoder,
                  encoder_parallel=args.encoder_parallel)
    if args.tp_size is not None:
        kwargs["tp_size"] = args.tp_size
    if args.encoder_sizes is not None:
        kwargs["encoder_sizes"] = args.encoder_sizes
    if args.encoder_seq_lens is not None:
        kwargs["encoder_seq_lens"] = args.encoder_seq_lens
    with LLM(args.model, **kwargs) as llm:
        vectors = llm.embed(texts=args.text)
        if not llm.is_driver:  # another rank of a torchrun launch: rank 0 prints the same result
            return 0
        if args.json:
            print(json.dumps({"embeddings": vectors, "stats": llm.stats()}))
        else:
            for v in vectors:
                print(" ".join(f"{x:.8g}" for x in v))
    return 0


def _seconds(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from graphcap.serving.server import ServeOptions, serve

    opts = ServeOptions(
        model=args.model, engine_kwargs=engine_kwargs(args), host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("GRAPHCAP_API_KEY") or None, max_waiting=args.max_waiting,
        request_timeout=args.request_timeout, served_model_name=args.served_model_name,
        shutdown_timeout=args.shutdown_timeout, access_log=args.access_log, verbose=args.verbose,
        threads=args.threads or 0,
    )
    return serve(opts)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from graphcap.serving.bench import BenchServeOptions, render, run_serve_bench, write_json

    opts = BenchServeOptions(
        url=args.url, concurrency=args.concurrency, requests=args.requests, max_tokens=args.max_tokens,
        prompt=args.prompt, model=args.bench_model, api_key=args.api_key, ignore_eos=args.ignore_eos,
        timeout=args.timeout, chat=args.chat,
    )
    result = run_serve_bench(opts)
    print(render(result))
    if args.json:
        write_json(result, args.json)
    return 0 if result["summary"]["errors"] == 0 else 1


def cmd_warmup(args: argparse.Namespace) -> int:
    """Start the engine once, so that the graph cache holds every graph and capture decision a later start with
    the same options restores (`graphcap serve` then starts warm)."""
    from graphcap import LLM
    from graphcap.config import config_from_kwargs
    from graphcap.executor.graph_cache import wants_graph_cache
    from graphcap.graph.cache import switched_off

    kwargs = engine_kwargs(args)
    if switched_off() or not wants_graph_cache(config_from_kwargs(args.model, kwargs)):
        raise UserError("the graph cache is off for these options (tensor parallelism, CUDA, no graphs, "
                        "--no-graph-cache, --no-cache or GRAPHCAP_GRAPH_CACHE=0): nothing to warm up")
    with LLM(args.model, **kwargs) as llm:
        stats = llm.stats()
    cache = stats.get("graph_cache") or {}
    if not cache.get("enabled"):
        raise UserError(f"the graph cache is off ({cache.get('warning') or 'not a decoder checkpoint'})")
    s = stats["startup"]
    print(f"{cache['dir']}: {s['cache']} start in {s['seconds']:.1f} s, {s['cache_hits']} buckets restored, "
          f"{s['cache_misses']} captured")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_cache(args: argparse.Namespace) -> int:
    """`cache ls`: the graph cache's entries with their sizes; `cache rm`: remove some or all of them."""
    import time

    from graphcap.graph.cache import list_entries, remove_entries

    if args.cache_command == "ls":
        entries = list_entries(args.cache_dir)
        for e in entries:
            saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.about["saved"])) if "saved" in e.about else "-"
            graphs = ", ".join(f"{phase} {n}" for phase, n in e.graphs.items()) or "incomplete"
            print(f"{e.key}  {_mib(e.bytes):>10}  {saved}  {e.about.get('model', '?')}  graphs: {graphs}")
        print(f"{len(entries)} entries, {_mib(sum(e.bytes for e in entries))}")
        return 0
    if not args.keys and not args.all:
        raise UserError("cache rm needs entry keys (or unique prefixes of them), or --all")
    if args.keys:
        known = [e.key for e in list_entries(args.cache_dir)]
        for k in args.keys:
            matches = [key for key in known if key.startswith(k)]
            if len(matches) != 1:
                raise UserError(f"{k!r} matches {len(matches)} cache entries; `graphcap cache ls` lists them")
    removed = remove_entries(args.keys, args.cache_dir)
    print(f"removed {len(removed)} entries, {_mib(sum(e.bytes for e in removed))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphcap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from one prompt")
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs a tokenizer in the checkpoint)")
    src.add_argument("--prompt-ids", type=_int_list, help="comma-separated token ids")
    add_sampling_args(gen, max_new_tokens=16)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="reply to one message through the checkpoint's chat template")
    add_engine_args(chat)
    chat.add_argument("--message", required=True, help="the user's message")
    chat.add_argument("--system", default=None, help="a system message before it")
    add_sampling_args(chat, max_new_tokens=256)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmark graph modes against eager and peers (BENCHMARKS.md); "
                                         "`graphcap bench serve`: load-test a running server",
                           epilog="`graphcap bench serve --url URL ...` load-tests a running `graphcap serve` "
                                  "instead (see `graphcap bench serve --help`).")
    add_engine_args(bench)
    bench.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16], help="decode batch sizes")
    bench.add_argument("--iters", type=_positive_int, default=20, help="interleaved timing turns per step row")
    bench.add_argument("--steps-per-turn", type=_positive_int, default=4,
                       help="consecutive steps of one mode per timed turn (1: strict step-by-step alternation)")
    bench.add_argument("--e2e-iters", type=_positive_int, default=3, help="timed rounds of end-to-end generation")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF transformers peers")
    bench.add_argument("--hf-compile", action="store_true", help="also time HF static cache + torch.compile (slow)")
    bench.add_argument("--allreduce", action="store_true", help="also time all-reduce (always with --tp > 1)")
    bench.add_argument("--encoder", default=None, metavar="MODEL",
                       help="also time an encoder (e.g. minilm): eager vs full graphs, batch 1/8/32 x seq 16/128")
    bench.add_argument("--kernels", action="store_true",
                       help="also time the block-quantised linear kernels per SmolLM2 shape, a decode step's worth, "
                            "and the integer/float-GEMM crossover")
    bench.add_argument("--peer", action="append", choices=["llamacpp"], default=[],
                       help="also time llama.cpp on the same GGUF file (needs the optional extra: "
                            "pip install -e '.[llamacpp]', a source build)")
    bench.add_argument("--peer-threads", type=_int_list, default=None,
                       help="thread counts of the peer rows (default: 1 and every core)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    bench.set_defaults(func=cmd_bench)

    emb = sub.add_parser("embed", help="embed texts with an encoder checkpoint (BERT; 'minilm' is the packaged one)")
    emb.add_argument("--model", required=True, help="encoder checkpoint directory, or minilm / all-MiniLM-L6-v2")
    emb.add_argument("--text", action="append", required=True, help="a text to embed (repeat for several)")
    emb.add_argument("--device", default="cpu")
    emb.add_argument("--dtype", default="float32")
    emb.add_argument("--graph-encoder", default="eager", help="eager or full")
    emb.add_argument("--encoder-sizes", type=_int_list, default=None, help="batch buckets, e.g. 1,8,32")
    emb.add_argument("--encoder-seq-lens", type=_int_list, default=None, help="sequence buckets, e.g. 16,32,64,128")
    emb.add_argument("--encoder-parallel", default="tp", help="tp (sharded over the TP group) or dp")
    emb.add_argument("--tp", type=int, default=None, dest="tp_size", help="tensor-parallel ranks")
    emb.add_argument("--graph-config", default=None, help="JSON file of engine/graph options")
    emb.add_argument("--json", action="store_true", help="print one JSON object: embeddings and stats")
    emb.set_defaults(func=cmd_embed)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    srv.add_argument("--port", type=_int, default=8000)
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $GRAPHCAP_API_KEY, else none)")
    srv.add_argument("--max-waiting", type=_non_negative_int, default=256,
                     help="requests that may wait for a batch slot; beyond it, HTTP 429 with Retry-After")
    srv.add_argument("--request-timeout", type=_seconds, default=None,
                     help="seconds a request may take, queueing included (default: no limit)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    srv.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                     help="on SIGTERM, seconds in-flight requests may take to finish before they are aborted")
    srv.add_argument("--access-log", action="store_true", help="log every HTTP request")
    if "--threads" not in srv._option_string_actions:  # unless an engine option of that name generated it
        srv.add_argument("--threads", type=_non_negative_int, default=0,
                         help="torch intra-op threads (default 0: torch's own choice; on a small shared machine 1 "
                              "avoids oversubscription stalls)")
    srv.set_defaults(func=cmd_serve)

    warm = sub.add_parser("warmup", help="capture and cache a model's graphs without serving: later starts with "
                                         "the same options are warm")
    add_engine_args(warm)
    warm.set_defaults(func=cmd_warmup)

    cache = sub.add_parser("cache", help="list (ls) or remove (rm) graph cache entries")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("ls", "list the entries and their sizes"), ("rm", "remove entries")):
        sp = cache_sub.add_parser(name, help=text)
        sp.add_argument("--cache-dir", default=None, help="the cache directory (default: the user cache dir)")
        if name == "rm":
            sp.add_argument("keys", nargs="*", metavar="KEY", help="entry keys or unique prefixes of them")
            sp.add_argument("--all", action="store_true", help="remove every entry")
    cache.set_defaults(func=cmd_cache)

    return parser


def build_bench_serve_parser() -> argparse.ArgumentParser:
    """`graphcap bench serve`: its flags have nothing in common with `graphcap bench`'s (which needs --model), so
    it is a parser of its own that `main` picks when `serve` follows `bench`."""
    sb = argparse.ArgumentParser(prog="graphcap bench serve",
                                 description="Load-test a running OpenAI-compatible server (`graphcap serve` or any "
                                             "other) with streaming requests: throughput, time to first token, "
                                             "inter-token and end-to-end latency percentiles, errors.")
    sb.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    sb.add_argument("--concurrency", type=_positive_int, default=8, help="clients sending requests at once")
    sb.add_argument("--requests", type=_positive_int, default=64, help="requests in all")
    sb.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens per request")
    sb.add_argument("--prompt", default="Write a short story about a robot learning to paint.",
                    help="the prompt every request sends")
    sb.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default: /v1/completions)")
    sb.add_argument("--model", dest="bench_model", default=None, metavar="NAME", help="model name (default: the server's first)")
    sb.add_argument("--api-key", default=None)
    sb.add_argument("--ignore-eos", action="store_true", help="ask for exactly --max-tokens tokens per request")
    sb.add_argument("--timeout", type=_seconds, default=600.0, help="seconds per request")
    sb.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    sb.set_defaults(func=cmd_bench_serve)
    return sb


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`graphcap [-v] bench serve ...` goes to its own parser; everything else to the main one."""
    start = 0
    while start < len(argv) and argv[start] in ("-v", "--verbose"):
        start += 1
    if argv[start:start + 2] == ["bench", "serve"]:
        args = build_bench_serve_parser().parse_args(argv[start + 2:])
        args.verbose = start > 0
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="graphcap: %(message)s")
    try:
        return args.func(args)
    except UserError as e:
        print(f"graphcap: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
