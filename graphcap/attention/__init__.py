"""Attention: metadata protocol, torch-native paged kernels, and the opaque custom op."""

from graphcap.attention.backend import TorchNativeAttnBackend
from graphcap.attention.metadata import AttentionMetadata, StaticMetadataBuffers, build_metadata

__all__ = ["AttentionMetadata", "StaticMetadataBuffers", "TorchNativeAttnBackend", "build_metadata"]
