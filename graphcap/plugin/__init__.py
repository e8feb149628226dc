"""Integration with host frameworks (vLLM, SGLang): graphcap's communicators join the host's graph capture."""

from graphcap.plugin.graph_capture_patch import DEFAULT_HOST_MODULES, apply_graph_capture_patch, prepare_model

__all__ = ["DEFAULT_HOST_MODULES", "apply_graph_capture_patch", "prepare_model"]
