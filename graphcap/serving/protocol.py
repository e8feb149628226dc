"""OpenAI request bodies checked field by field, so every mistake is a 400 in OpenAI's error shape naming the
parameter, and errors in that shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_STOP = 16

# Fields accepted and ignored: they change nothing a client can observe here.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "stream",
           "stream_options", "ignore_eos", "return_token_ids", "presence_penalty", "frequency_penalty",
           "logit_bias", "logprobs"} | _IGNORED
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "functions", "function_call", "response_format", "modalities",
                         "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """What the two endpoints share once checked."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    n: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    return_token_ids: bool
    extra: dict = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(body: dict, name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad(f"'{name}' must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise bad(f"'{name}' must be at least {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be at most {hi}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(f"'{name}' must be a number, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _unsupported(name: str, why: str = "") -> APIError:
    return bad(f"'{name}' is not supported by this server{why}", name, "unsupported_parameter")


def _model_of(body: Any, allowed: set[str]) -> str:
    """The requested model, once the body is an object of known arguments."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise bad(f"unrecognized request argument: {name!r}", name, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a string", "model")
    return model


def parse_common(body: Any, allowed: set[str]) -> GenerationRequest:
    model = _model_of(body, allowed)
    max_tokens = _int(body, "max_tokens", None, lo=1)
    if "max_completion_tokens" in allowed:
        mct = _int(body, "max_completion_tokens", None, lo=1)
        if mct is not None:
            max_tokens = mct
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0 or temperature > 2:
        raise bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _int(body, "top_k", -1, lo=-1)
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise bad(f"'seed' must be in [0, 2**63), got {seed}", "seed")
    stop = _opt(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' holds at most {MAX_STOP} strings, got {len(stop)}", "stop")
    stop_ids = _opt(body, "stop_token_ids", [])
    if not isinstance(stop_ids, list) or any(not _is_int(t) or t < 0 for t in stop_ids):
        raise bad("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    n = _int(body, "n", 1, lo=1, hi=MAX_N)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or any(k not in ("include_usage", "continuous_usage_stats") for k in options):
            raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = _bool(options, "include_usage", False)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise _unsupported(name)
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    return GenerationRequest(
        model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=stop, stop_token_ids=stop_ids, n=n, stream=stream, include_usage=include_usage,
        ignore_eos=_bool(body, "ignore_eos", False), return_token_ids=_bool(body, "return_token_ids", False),
    )


def parse_completion(body: Any) -> tuple[GenerationRequest, Any]:
    """The shared fields and the raw prompt (a string, a list of strings, token ids, or a list of those)."""
    req = parse_common(body, COMPLETION_FIELDS)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        raise _unsupported("logprobs", ": the sampler does not compute log-probabilities")
    if _bool(body, "echo", False):
        raise _unsupported("echo")
    if body.get("suffix") is not None:
        raise _unsupported("suffix")
    best_of = _int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != req.n:
        raise _unsupported("best_of", " (other than best_of == n)")
    if "prompt" not in body or body["prompt"] is None:
        raise bad("'prompt' is required", "prompt")
    return req, body["prompt"]


def parse_chat(body: Any) -> tuple[GenerationRequest, list]:
    req = parse_common(body, CHAT_FIELDS)
    if _bool(body, "logprobs", False):
        raise _unsupported("logprobs", ": the sampler does not compute log-probabilities")
    if body.get("top_logprobs") is not None:
        raise _unsupported("top_logprobs", ": the sampler does not compute log-probabilities")
    for name in ("tools", "functions", "prediction", "audio", "web_search_options"):
        if body.get(name):
            raise _unsupported(name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _unsupported(name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _unsupported("response_format", " (only {\"type\": \"text\"})")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", " (only [\"text\"])")
    if body.get("reasoning_effort") is not None or body.get("verbosity") is not None:
        raise _unsupported("reasoning_effort" if body.get("reasoning_effort") is not None else "verbosity")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    return req, messages


def prompt_token_lists(prompt: Any, encode, has_tokenizer: bool) -> list[list[int]]:
    """A completion's `prompt` as token-id lists: a string, a list of strings, a list of ids, or a list of lists."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                       for p in prompt):
        return [list(p) for p in prompt]
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    if not has_tokenizer:
        raise bad("this model has no tokenizer: send 'prompt' as token ids", "prompt")
    return [encode(p) for p in prompts]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per /v1/embeddings request
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions"} | _IGNORED


@dataclass
class EmbeddingRequest:
    """A checked /v1/embeddings body: `texts` or `token_ids` is set, never both."""

    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding_format: str  # "float" or "base64" (little-endian float32, as OpenAI sends it)
    dimensions: int | None


def parse_embedding(body: Any) -> EmbeddingRequest:
    """`input` as OpenAI takes it: a string, a list of strings, a list of token ids or a list of such lists."""
    model = _model_of(body, EMBEDDING_FIELDS)
    fmt = _opt(body, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    dimensions = _int(body, "dimensions", None, lo=1)
    value = body.get("input")
    texts, token_ids = None, None
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        texts = value
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        token_ids = [value]
    elif isinstance(value, list) and value and all(isinstance(x, list) and all(_is_int(t) for t in x)
                                                  for x in value):
        token_ids = value
    else:
        raise bad("'input' must be a non-empty string, a list of strings, a list of token ids or a list of such "
                  "lists", "input")
    inputs = texts if texts is not None else token_ids
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad(f"'input' holds at most {MAX_EMBEDDING_INPUTS} items, got {len(inputs)}", "input")
    for i, x in enumerate(inputs):
        if not x:
            raise bad(f"input {i} is empty", "input")
    return EmbeddingRequest(model, texts, token_ids, fmt, dimensions)
