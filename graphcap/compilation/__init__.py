"""The compilation layer: configuration, the Inductor post-grad pass manager and its passes.

Everything here works on FX graphs; the torch.compile backend and graph splitting live beside it.
"""

from graphcap.compilation.config import CompilationConfig, PassConfig

__all__ = ["CompilationConfig", "PassConfig"]
