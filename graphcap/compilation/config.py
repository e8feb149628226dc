"""What the compilation layer does, as frozen, hashable values with a stable digest.

The digest keys compiled artifacts, so it is computed from a canonical JSON form (sorted keys, sorted sets)
rather than from Python's `hash`, which changes from process to process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graphcap.common.digest import digest_of
from graphcap.errors import UserError

_BACKENDS = ("inductor", "eager")


def _reject_unknown(cls: type, data: dict) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class PassConfig:
    """One switch per optional post-grad pass. Fix-functionalization is not optional: it always runs last,
    because leaving in-place ops functionalised costs a copy per op."""

    enable_noop: bool = True
    enable_rms_quant_fusion: bool = True
    enable_act_quant_fusion: bool = True
    enable_allreduce_rms_fusion: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise UserError(f"PassConfig.{f.name} must be true or false, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return digest_of(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassConfig":
        _reject_unknown(cls, data)
        return cls(**data)


@dataclass(frozen=True)
class CompilationConfig:
    """How a graph is compiled: the backend, where graphs are split, which layers use custom ops (which the
    passes need to match), the passes, and the artifact cache."""

    backend: str = "inductor"
    splitting_ops: tuple[str, ...] = ("graphcap::attention", "graphcap::all_reduce")
    custom_ops: frozenset[str] = frozenset()
    pass_config: PassConfig = field(default_factory=PassConfig)
    cache_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise UserError(f"compilation backend must be one of {list(_BACKENDS)}, got {self.backend!r}")
        # Accept lists and sets from callers but store hashable, order-preserving / canonical forms.
        object.__setattr__(self, "splitting_ops", tuple(self.splitting_ops))
        object.__setattr__(self, "custom_ops", frozenset(self.custom_ops))
        if isinstance(self.pass_config, dict):
            object.__setattr__(self, "pass_config", PassConfig.from_dict(self.pass_config))

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "splitting_ops": list(self.splitting_ops),
            "custom_ops": sorted(self.custom_ops),
            "pass_config": self.pass_config.to_dict(),
            "cache_dir": self.cache_dir,
            "use_cache": self.use_cache,
        }

    def digest(self) -> str:
        """Hash of what changes compiled code; where the cache lives, and whether it is used, do not."""
        data = self.to_dict()
        del data["cache_dir"], data["use_cache"]
        return digest_of(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompilationConfig":
        _reject_unknown(cls, data)
        return cls(**data)
