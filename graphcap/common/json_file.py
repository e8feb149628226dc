"""Reading a JSON file that must hold an object (config.json, tokenizer_config.json, option files)."""

from __future__ import annotations

import json
from pathlib import Path

from graphcap.errors import UserError


def read_json_object(path: Path) -> dict:
    """The object a JSON file holds; a missing, unreadable or malformed file is a one-line UserError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return parse_json_object(text, str(path))


def parse_json_object(text: str, what: str) -> dict:
    """The object `text` holds; malformed JSON or another kind of value is a one-line UserError naming `what`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must hold a JSON object")
    return data
