"""Turning one parsed record of any supported format into the internal conversation form, or a reject reason.

The internal form is a list of `{"role": "system"|"user"|"assistant", "content": str}`; plain-text records
(`text` format) become a single `{"role": "text", ...}` turn that is trained on in full.
"""

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Reject(Exception):
    """A record that cannot be trained on; `reason` is a short stable name counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in (the first in FORMATS whose keys it has), or None."""
    if not isinstance(record, dict):
        return None
    return next((name for name, fmt in FORMATS.items() if fmt.keys <= record.keys()), None)


def normalize(record: Any, fmt: str) -> list[dict[str, str]]:
    """The record as a cleaned list of turns; raises Reject with the reason it cannot be used."""
    if not isinstance(record, dict):
        raise Reject("wrong_shape", f"expected a JSON object, got {type(record).__name__}")
    turns = FORMATS[fmt].turns(record)
    if fmt != "text" and not any(t["role"] == "assistant" for t in turns):
        raise Reject("no_assistant_turn", "nothing to learn from")
    return turns


# Unicode's control characters (category Cc: U+0000-U+001F and U+007F-U+009F) but newline and tab
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """NFC-normalised text without control characters (newline and tab are kept)."""
    return CONTROL.sub("", unicodedata.normalize("NFC", text))


def _turns(
    record: dict,
    key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    alternate: tuple[str, str] | None = None,
) -> list[dict[str, str]]:
    items = record.get(key)
    if isinstance(items, str) and items.lstrip().startswith("["):  # a CSV cell holding the list as JSON
        try:
            items = json.loads(items)
        except (ValueError, RecursionError):
            raise Reject("wrong_shape", f"`{key}` is text that is not a JSON list") from None
    if not isinstance(items, list) or not items:
        raise Reject("wrong_shape", f"`{key}` must be a non-empty list")
    turns = []
    for i, item in enumerate(items):
        rk, ck = role_key, content_key
        if alternate and isinstance(item, dict) and ck not in item and alternate[1] in item:
            rk, ck = alternate
        if not isinstance(item, dict) or not isinstance(item.get(ck), str):
            raise Reject("wrong_shape", f"{key}[{i}] must be an object with a string `{ck}`")
        role = roles.get(item.get(rk)) if isinstance(item.get(rk), str) else None
        if role is None:
            raise Reject("unknown_role", f"{key}[{i}].{rk}={item.get(rk)!r}")
        content = clean_text(item[ck])
        if not content.strip():
            raise Reject("empty_content", f"{key}[{i}] is empty")
        turns.append({"role": role, "content": content})
    return turns


def _alpaca(record: dict) -> list[dict[str, str]]:
    fields = {}
    for name in ("instruction", "input", "output"):
        value = record.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise Reject("wrong_shape", f"`{name}` must be a string")
        fields[name] = clean_text(value)
    if not fields["instruction"].strip() or not fields["output"].strip():
        raise Reject("empty_content", "instruction and output must not be empty")
    prompt = fields["instruction"] if not fields["input"].strip() else f"{fields['instruction']}\n\n{fields['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]


def _text(record: dict) -> list[dict[str, str]]:
    """A plain-text record: one turn, trained on in full."""
    text = record.get("text")
    if not isinstance(text, str):
        raise Reject("wrong_shape", "`text` must be a string")
    text = clean_text(text)
    if not text.strip():
        raise Reject("empty_content", "text is empty")
    return [{"role": "text", "content": text}]


@dataclass(frozen=True)
class Format:
    keys: frozenset  # the keys that mark a record as this format (`data.format: auto`)
    turns: Callable[[dict], list[dict[str, str]]]  # the record's turns, or Reject


# Every record format, in the order `auto` tries them. Adding one is a function and a line here.
FORMATS = {
    "messages": Format(
        frozenset({"messages"}), lambda r: _turns(r, "messages", "role", "content", {x: x for x in ROLES})
    ),
    # ShareGPT's turns are {"from", "value"}; many datasets that follow it write {"role", "content"} instead
    "sharegpt": Format(
        frozenset({"conversations"}),
        lambda r: _turns(r, "conversations", "from", "value", SHAREGPT_ROLES, alternate=("role", "content")),
    ),
    "alpaca": Format(frozenset({"instruction", "output"}), _alpaca),
    "text": Format(frozenset({"text"}), _text),
}
