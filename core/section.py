"""Base class for the typed config sections each package owns (pydantic, one docstring per field), and the one
line a validation error becomes."""

import difflib
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import UserError
from core.keys import set_dotted, shown


class Section(BaseModel):
    """A config section: unknown keys are errors, field docstrings become the field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # dotted keys whose values may carry credentials: never echoed in an error (set on the root section)
    hidden_keys: ClassVar[frozenset[str]] = frozenset()


def validated(model: type[Section], raw: dict, source: str, overrides: list[str] = ()) -> Section:
    """`raw` as a `model`; a bad key or value is a one-line UserError naming `source` (a file, or what set the
    values) and the override at fault."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe(exc, model, source, list(overrides))) from None


def with_values(cfg: Section, values: dict[str, Any], source: str) -> Section:
    """A copy of `cfg` with dotted keys set to the given values, validated like the file: a bad key or value is a
    one-line UserError naming `source` (e.g. a tune trial's parameters)."""
    raw = cfg.model_dump(mode="json")
    items = [f"{key}={value}" for key, value in values.items()]
    for key, value in values.items():
        set_dotted(raw, key, value, f"{key}={value}")
    return validated(type(cfg), raw, source, items)


def describe(exc: ValidationError, model: type[Section], path: str, overrides: list[str]) -> str:
    """One line for the first problem pydantic found."""
    errors = exc.errors()
    # the most specific first: a list of sources that fails inside one of them also fails as a plain string
    err = max(errors, key=lambda e: len(_field_loc(e["loc"])))
    loc = _field_loc(err["loc"])
    key = "".join(_key_part(p) for p in loc).lstrip(".")
    source = _source_of(key, path, overrides, model.hidden_keys)
    if err["type"] == "extra_forbidden":
        hint = _suggest(model, loc)
        return f"unknown key {key} in {source}" + (f" (did you mean {hint}?)" if hint else "")
    if err["type"] == "missing":
        return f"missing key {key} in {source}"
    # a union (e.g. a number or "auto") fails once per member: say every way the value could be valid
    msgs = [e["msg"] for e in errors if _field_loc(e["loc"]) == loc]
    msg = " or ".join(dict.fromkeys(m[len("Value error, ") :] if m.startswith("Value error, ") else m for m in msgs))
    got = err.get("input")
    hidden = isinstance(got, dict) or key in model.hidden_keys
    return f"invalid value for {key} in {source}: {msg}" + ("" if hidden else f" (got {got!r})")


_UNION_TAG = re.compile(r"^(constrained-)?(int|float|str|bool|none)$|^(literal|list|dict|tuple|function-\w+)\[")


def _key_part(part: str) -> str:
    """A key's part as it is spelled in a dotted path; a name no one could type (a newline, a space) quoted, so the
    message stays one line."""
    if part.isdigit():
        return f"[{part}]"
    return f".{part}" if part.isprintable() and not any(c.isspace() for c in part) else f"[{part!r}]"


def _field_loc(loc: tuple) -> list[str]:
    """The config key of an error, without the union-member tags pydantic puts in its location."""
    return [str(p) for p in loc if not _UNION_TAG.match(str(p))]


def _source_of(key: str, path: str, overrides: list[str], hidden_keys: frozenset[str]) -> str:
    for item in overrides:
        name = item.partition("=")[0]
        if key == name or key.startswith(name + ".") or name.startswith(key + "."):
            return f"{path} (override {name}=...)" if key in hidden_keys else f"{path} (override {shown(item)})"
    return path


def _suggest(model: type[Section], loc: list[str]) -> str | None:
    """The closest valid key at the same place, spelled as a dotted path."""
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, Section)):
            return None
        model = sub
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return ".".join(loc[:-1] + match) if match else None
