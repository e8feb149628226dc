"""Patch a host framework's `GroupCoordinator.graph_capture` so that capturing also enters graphcap's
communicators' `capture()` contexts.

Why: when graphcap layers run inside vLLM or SGLang, the host owns graph capture; a collective issued
from a captured graph must still find graphcap's communicators prepared (shared-memory path switched in,
workspace ready, peers met), or it serves captured graphs from the eager path. The patch wraps the host's
context rather than replacing it: the host's arguments pass through exactly as given and its context object
is yielded unchanged. Whether graphcap's tensor-parallel coordinator exists is decided each time a capture
starts, so the patch can be applied before or after graphcap initialises distributed, or when it never does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from graphcap.distributed import parallel_state

logger = logging.getLogger(__name__)

DEFAULT_HOST_MODULES = ("vllm.distributed.parallel_state", "sglang.srt.distributed.parallel_state")
_MARK = "__graphcap_graph_capture_patch__"

ModelT = TypeVar("ModelT")


def apply_graph_capture_patch(module_path: str | None = None) -> bool:
    """Patch `module_path` (or every importable default host module). True when a patch is in place,
    including when it already was; False, with the reason logged, when there was nothing to patch."""
    paths = (module_path,) if module_path is not None else DEFAULT_HOST_MODULES
    return any([_patch_module(path) for path in paths])


def prepare_model(model: ModelT, module_path: str | None = None) -> ModelT:
    """Entry point for a host's model-loading hook: make the host's capture include graphcap's
    communicators (once, however often it is called) and hand the model back unchanged."""
    apply_graph_capture_patch(module_path)
    return model


def _patch_module(path: str) -> bool:
    try:
        module = importlib.import_module(path)
    except ImportError as exc:
        logger.info("graph-capture patch not applied: cannot import %s (%s)", path, exc)
        return False
    coordinator_cls = getattr(module, "GroupCoordinator", None)
    original = getattr(coordinator_cls, "graph_capture", None)
    if coordinator_cls is None or not callable(original):
        logger.info("graph-capture patch not applied: %s has no GroupCoordinator.graph_capture", path)
        return False
    if getattr(original, _MARK, False):
        return True
    coordinator_cls.graph_capture = _wrap(original)
    logger.info("graph-capture patch applied to %s.GroupCoordinator", path)
    return True


def _wrap(original: Callable[..., AbstractContextManager[Any]]) -> Callable[..., AbstractContextManager[Any]]:
    @functools.wraps(original)
    @contextlib.contextmanager
    def graph_capture(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with _graphcap_capture(), original(self, *args, **kwargs) as host_context:
            yield host_context

    setattr(graph_capture, _MARK, True)
    return graph_capture


def _graphcap_capture() -> AbstractContextManager[None]:
    """graphcap's communicators' capture when its TP coordinator exists now, else nothing. Stream handling
    stays with the host, so only the communicators are entered, not the coordinator's `graph_capture()`."""
    coordinator = parallel_state.get_tp_group()
    if coordinator is None:
        return contextlib.nullcontext()
    return coordinator.capture_communicators()
