"""Rendering conversations with the model's own chat template and marking which tokens carry loss.

Works with any Hugging Face chat template whose renderings grow by appending (the usual case): the characters a
reply adds between "history + generation prompt" and "history + reply" are the assistant's, end-of-turn marker
included, so the model learns to stop. Token labels come from the fast tokenizer's character offsets.
"""

from typing import Any, Sequence

IGNORE = -100  # label value that torch's cross-entropy (and transformers' loss) skips


class TemplateError(Exception):
    """The tokenizer cannot render conversations the way masking needs."""


def render(tokenizer, turns: Sequence[dict[str, str]], loss_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """The full text of a conversation and the character spans that carry loss."""
    if len(turns) == 1 and turns[0]["role"] == "text":
        text = turns[0]["content"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    messages = list(turns)
    full = _template(tokenizer, messages, add_generation_prompt=False)
    if loss_on == "all":
        return full, [(0, len(full))]
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        # A conversation that opens with a reply has no history to render: the whole prefix is the reply's.
        before = _template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render conversations by appending turns, so assistant tokens "
                "cannot be located; use a model whose template does, or data.loss_on: all"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_batch(tokenizer, conversations: list[list[dict[str, str]]], max_length: int,
                   loss_on: str = "assistant") -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels (IGNORE outside loss spans) for a batch, truncated to `max_length` tokens."""
    texts, all_spans = [], []
    for turns in conversations:
        text, spans = render(tokenizer, turns, loss_on)
        texts.append(text)
        all_spans.append(spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    labels = []
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans):
        labels.append([tok if _inside(start, spans) else IGNORE for tok, (start, _) in zip(ids, offsets)])
    return [list(ids) for ids in enc["input_ids"]], labels


def check_tokenizer(tokenizer, name: str) -> None:
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
        render(tokenizer, sample)
    except TemplateError as exc:
        raise TemplateError(f"{name}: {exc}") from None
    except Exception as exc:  # a template that rejects system turns etc. is still usable without them
        try:
            render(tokenizer, sample[1:])
        except TemplateError as inner:
            raise TemplateError(f"{name}: {inner}") from None
        except Exception:
            raise TemplateError(f"{name}: its chat template fails on a plain conversation: {exc}") from None


def _template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _inside(start: int, spans: list[tuple[int, int]]) -> bool:
    return any(lo <= start < hi for lo, hi in spans)
