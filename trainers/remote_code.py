"""Model folders that bring their own code: refused unless the user trusts them."""

import json
import os

from core.errors import UserError


def check_remote_code(model_dir: str, trusted: bool, key: str, allow: str) -> None:
    """A model folder whose config or tokenizer names code of its own (`auto_map`) runs that code when loaded:
    refused, before anything loads it, unless the user said to trust it (`allow` says how)."""
    if trusted:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(model_dir, name), encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map")
        except (OSError, ValueError, AttributeError):  # absent or unreadable: transformers will say so
            continue
        if auto_map:
            refs = [ref for v in auto_map.values() for ref in (v if isinstance(v, list) else [v]) if ref]
            files = sorted({str(ref).split("--")[-1].split(".")[0] + ".py" for ref in refs})
            raise UserError(
                f"{key}: {model_dir} runs code of its own when loaded ({name} auto_map names "
                f"{', '.join(files)}); zeray runs no model code unless you set {allow}"
            )
