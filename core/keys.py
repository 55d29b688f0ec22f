"""Dotted config keys (`train.lr`): how overrides, Tune parameters and trackers name a setting."""

from typing import Any

from core.errors import UserError


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: `{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(raw: dict, key: str, value: Any, item: str) -> None:
    """raw[a][b][c] = value for key "a.b.c", making sections on the way; `item` is what the user typed (named
    in the error when a part of the key is a value, not a section)."""
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {shown(item)}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def shown(item: str) -> str:
    """An override as the user typed it, quoted when it holds line breaks or other unprintable characters (an error
    is one line)."""
    return item if item.isprintable() else repr(item)
