"""Rendering conversations with the model's own chat template and marking which tokens carry loss.

Works with any Hugging Face chat template whose renderings grow by appending (the usual case): the characters a
reply adds between "history + generation prompt" and "history + reply" are the assistant's, end-of-turn marker
included, so the model learns to stop. Token labels come from the fast tokenizer's character offsets.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

IGNORE = -100  # label value that torch's cross-entropy (and transformers' loss) skips


class TemplateError(Exception):
    """The tokenizer cannot render conversations the way masking needs."""


@dataclass
class Rendering:
    """A conversation as the model sees it: its text, the character spans that carry loss, and the span of each
    assistant reply (a conversation may be cut short only at the end of one)."""

    text: str
    spans: list[tuple[int, int]]
    replies: list[tuple[int, int]] | None  # None: no turn structure to respect, any token boundary will do


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    problem: str = ""  # "" | "truncated" | "too_long"
    detail: str = ""


def render(tokenizer, turns: Sequence[dict[str, str]], loss_on: str = "assistant") -> Rendering:
    """Render with the chat template and locate what is trained: `assistant` replies, only the `last` reply,
    or `all` tokens."""
    if len(turns) == 1 and turns[0]["role"] == "text":
        text = turns[0]["content"] + (tokenizer.eos_token or "")
        return Rendering(text, [(0, len(text))], None)
    messages = list(turns)
    full = _template(tokenizer, messages, add_generation_prompt=False)
    try:
        replies = _reply_spans(tokenizer, messages, full)
    except TemplateError:
        if loss_on != "all":
            raise
        return Rendering(full, [(0, len(full))], None)  # trained throughout; only turn-aware cutting is lost
    if loss_on == "all":
        return Rendering(full, [(0, len(full))], replies)
    return Rendering(full, replies[-1:] if loss_on == "last" else replies, replies)


def _reply_spans(tokenizer, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        # A conversation that opens with a reply has no history to render: the whole prefix is the reply's.
        before = _template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = full if i == len(messages) - 1 else _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render conversations by appending turns, so assistant tokens "
                "cannot be located; use a model whose template does, or data.loss_on: all"
            )
        spans.append((len(before), len(upto)))
    return spans


def tokenize_batch(tokenizer, conversations: list[list[dict[str, str]]], max_length: int,
                   loss_on: str = "assistant", overlong: str = "truncate") -> list[Tokenized]:
    """Token ids and labels (IGNORE outside loss spans) for a batch of conversations.

    A conversation longer than `max_length` tokens is, with `overlong: truncate`, cut after the last assistant
    reply that fits (loss stays on the replies kept, `last` meaning the last one kept); plain text is cut at
    `max_length`. One whose first reply does not fit, or any with `overlong: reject`, comes back `too_long`.
    """
    renderings = [render(tokenizer, turns, loss_on) for turns in conversations]
    enc = tokenizer([r.text for r in renderings], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for r, ids, offsets in zip(renderings, enc["input_ids"], enc["offset_mapping"]):
        n, problem, detail, spans = len(ids), "", "", r.spans
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        if n > max_length:
            if overlong == "reject":
                out.append(Tokenized([], [], "too_long", f"{n} tokens, over data.max_length {max_length}"))
                continue
            if r.replies is None:
                keep = max_length
            else:
                # tokens that end by each reply's end; the cut is the last reply that fits
                ends = [int((offsets[:, 1] <= hi).sum()) for _, hi in r.replies]
                fitting = [(k, reply) for k, reply in zip(ends, r.replies) if k <= max_length]
                if not fitting:
                    out.append(Tokenized([], [], "too_long", f"its first reply ends at token {ends[0]}, over "
                                                             f"data.max_length {max_length}; cannot cut at a turn"))
                    continue
                keep, last_kept = fitting[-1]
                if loss_on == "last":
                    spans = [last_kept]
            ids, offsets = ids[:keep], offsets[:keep]
            problem, detail = "truncated", f"{n} tokens cut to {keep}"
        ids = np.asarray(ids, dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:  # a token carries loss when it starts inside a span
            trained |= (offsets[:, 0] >= lo) & (offsets[:, 0] < hi)
        out.append(Tokenized(ids.tolist(), np.where(trained, ids, IGNORE).tolist(), problem, detail))
    return out


def check_tokenizer(tokenizer, name: str, loss_on: str = "assistant") -> None:
    """Fail early, with the reason, if masking cannot work with this tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"tokenizer of {name} is not a fast tokenizer; character offsets are needed for masking")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer of {name} has no chat_template; add one or use data.format: text")
    sample = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    try:
        render(tokenizer, sample, loss_on)
    except TemplateError as exc:
        raise TemplateError(f"{name}: {exc}") from None
    except Exception as exc:  # a template that rejects system turns etc. is still usable without them
        try:
            render(tokenizer, sample[1:], loss_on)
        except TemplateError as inner:
            raise TemplateError(f"{name}: {inner}") from None
        except Exception:
            raise TemplateError(f"{name}: its chat template fails on a plain conversation: {exc}") from None


def _template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
