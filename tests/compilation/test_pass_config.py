"""Configs are hashable with stable digests; pass uuids follow the pass source and configuration."""

from __future__ import annotations

import pytest

from graphcap.compilation.config import CompilationConfig, PassConfig
from graphcap.compilation.pass_manager import PostGradPassManager
from graphcap.compilation.passes.fix_functionalization import FixFunctionalizationPass
from graphcap.compilation.passes.rms_quant_fusion import RMSNormQuantFusionPass
from graphcap.errors import UserError


def test_configs_are_hashable_and_digests_stable() -> None:
    a = CompilationConfig(splitting_ops=["graphcap::attention"], custom_ops={"rms_norm", "silu_and_mul"})
    b = CompilationConfig.from_dict(
        {"splitting_ops": ["graphcap::attention"], "custom_ops": ["silu_and_mul", "rms_norm"]}
    )
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.digest() == b.digest()
    assert a.digest() != CompilationConfig(custom_ops={"rms_norm"}).digest()
    off = CompilationConfig(pass_config={"enable_rms_quant_fusion": False})
    assert off.pass_config == PassConfig(enable_rms_quant_fusion=False)
    assert off.digest() != CompilationConfig().digest()
    assert CompilationConfig(cache_dir="/tmp/x").digest() == CompilationConfig().digest()
    assert CompilationConfig().splitting_ops == ("graphcap::attention", "graphcap::all_reduce")


def test_from_dict_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(UserError, match="enable_magic"):
        PassConfig.from_dict({"enable_magic": True})
    with pytest.raises(UserError, match="splitting"):
        CompilationConfig.from_dict({"splitting": []})
    with pytest.raises(UserError, match="backend"):
        CompilationConfig(backend="tvm")
    with pytest.raises(UserError, match="unknown PassConfig"):
        CompilationConfig.from_dict({"pass_config": {"enable_fusion": True}})


def test_pass_uuid_follows_config() -> None:
    assert RMSNormQuantFusionPass().uuid() == RMSNormQuantFusionPass(("dynamic", "static")).uuid()
    assert RMSNormQuantFusionPass(("static",)).uuid() != RMSNormQuantFusionPass().uuid()
    assert FixFunctionalizationPass().uuid() != RMSNormQuantFusionPass().uuid()
    full = PostGradPassManager(PassConfig())
    assert full.uuid() == PostGradPassManager(PassConfig()).uuid()
    assert full.uuid() != PostGradPassManager(PassConfig(enable_act_quant_fusion=False)).uuid()
    assert [p.name for p in full.passes][-1] == "fix_functionalization"
    assert list(PostGradPassManager(PassConfig(False, False, False, False)).match_counts()) == ["fix_functionalization"]
