"""The wheel ships what the C++ CPU kernels' build reads, and the kernels build from an installed copy.

The editable install used for development reads `graphcap/ops/csrc` from the source tree, so it cannot
notice a kernel file missing from the package data; without one, an installed graphcap silently serves
torch ops instead. This test builds a wheel from a clean copy of the project, installs it outside the
source tree and builds the kernels there, with a fresh kernel cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "graphcap" / "ops" / "csrc"

# Not part of the project: the environment, VCS data, build outputs and caches. A stale build/ in
# particular would let setuptools put files in the wheel that the package data no longer names.
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".hypothesis")

# Runs in the installed copy: where graphcap comes from, whether the kernels built there (not the torch
# fallback), and one decode call against the torch formulation it replaces.
PROBE = r"""
import json, sys
import torch
import graphcap
from graphcap.common.digest import default_cache_dir
from graphcap.ops import cpu_kernels
from graphcap.attention import torch_native

result = {"graphcap": graphcap.__file__, "cache_dir": str(default_cache_dir()), "status": cpu_kernels.status()}
if result["status"] == "ready":
    result["built"] = sorted(str(p) for p in (default_cache_dir() / "kernels").rglob("graphcap_cpu_kernels.so"))
    gen = torch.Generator().manual_seed(0)
    page, heads, kv_heads, head_dim = 4, 4, 2, 16
    k_cache = torch.randn(6 * page, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(6 * page, kv_heads, head_dim, generator=gen)
    q = torch.randn(2, heads, head_dim, generator=gen)
    block_table = torch.tensor([[3, 1, 5], [2, 4, 0]])
    kv_indices = (block_table.unsqueeze(-1) * page + torch.arange(page)).reshape(2, -1)
    q_pos = torch.tensor([[9], [6]])
    scale = head_dim**-0.5
    got = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, kv_indices, q_pos, scale)
    want = torch_native.decode_attention(q, k_cache, v_cache, kv_indices, q_pos, scale)
    result["max_abs_diff"] = (got - want).abs().max().item()
print(json.dumps(result))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc


def test_installed_wheel_builds_cpu_kernels(tmp_path: Path) -> None:
    src, dist, site, cache = tmp_path / "src", tmp_path / "dist", tmp_path / "site", tmp_path / "cache"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}

    # --no-build-isolation: build with the environment's setuptools instead of downloading one.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(src)], env=pip_env, cwd=tmp_path)
    (wheel,) = dist.glob("graphcap-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    needed = {path.relative_to(ROOT).as_posix() for path in CSRC.rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    assert needed, f"no kernel files found under {CSRC}"
    assert needed <= names, f"the wheel lacks {sorted(needed - names)}; check [tool.setuptools.package-data]"

    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         env=pip_env, cwd=tmp_path)

    # The interpreter's environment supplies torch and the other dependencies; PYTHONPATH puts the installed
    # copy ahead of the editable one. A fresh XDG cache makes the kernels build from the installed sources
    # rather than load a build cached by the source tree; the interpreter's bin (ninja) goes on PATH, as in
    # an activated environment.
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(cache),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = _run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, timeout=600)
    detail = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert Path(result["graphcap"]).resolve().is_relative_to(site.resolve()), detail
    assert Path(result["cache_dir"]).resolve().is_relative_to(cache.resolve()), detail
    assert result["status"] == "ready", f"kernels did not build from the installed wheel: {result['status']}\n{detail}"
    assert result["built"], f"no kernel library under the fresh cache {cache}\n{detail}"
    assert result["max_abs_diff"] < 1e-5, detail
