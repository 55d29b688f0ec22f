"""Rendering conversations with the model's own chat template and marking which tokens carry loss.

Works with any Hugging Face chat template whose renderings grow by appending (the usual case): the characters a
reply adds between "history + generation prompt" and "history + reply" are the assistant's, end-of-turn marker
included, so the model learns to stop. Token labels come from the fast tokenizer's character offsets.
"""

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    problem: str = ""  # "" | "truncated" | "too_long" | "template_error"
    detail: str = ""


class ChatTokenizer:
    """A model's tokenizer made ready for a stream of conversations: its chat template compiled once and its
    Rust backend called directly, each checked against transformers' own results for the same input first.

    `apply_chat_template` and the tokenizer's `__call__` pay per call for what a stream of plain
    `{"role", "content"}` messages does not need (normalising message objects, rebuilding the special-tokens map,
    converting every encoding to Python lists): over half the cost of rendering and tokenizing a short
    conversation. Where the checks fail (a tokenizer without a Rust backend, a template that renders differently
    when compiled apart), the transformers calls are used as they are.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        self._render = _compiled_template(tokenizer)
        self._encode = _backend_encoder(tokenizer)

    def template(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if self._render is not None:
            return self._render(messages, add_generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, texts: list[str]) -> list[tuple[list[int], "OffsetPositions | EncodingPositions"]]:
        """Token ids of each text (no special tokens added), with where each token sits in the text."""
        if self._encode is not None:
            return [(e.ids, EncodingPositions(e, len(text))) for text, e in zip(texts, self._encode(texts))]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (ids, OffsetPositions([tuple(o) for o in offsets]))
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])
        ]

    def render(self, turns: Sequence[dict[str, str]], loss_on: str = "assistant") -> Rendering:
        """Render with the chat template and locate what is trained: `assistant` replies, only the `last` reply,
        or `all` tokens."""
        if len(turns) == 1 and turns[0]["role"] == "text":
            text = turns[0]["content"] + self.eos
            return Rendering(text, [(0, len(text))], None)
        messages = list(turns)
        full = self.template(messages, add_generation_prompt=False)
        try:
            replies = self._reply_spans(messages, full)
        except TemplateError:
            if loss_on != "all":
                raise
            return Rendering(full, [(0, len(full))], None)  # trained throughout; only turn-aware cutting is lost
        if loss_on == "all":
            return Rendering(full, [(0, len(full))], replies)
        return Rendering(full, replies[-1:] if loss_on == "last" else replies, replies)

    def _reply_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            # A conversation that opens with a reply has no history to render: the whole prefix is the reply's.
            before = self.template(messages[:i], add_generation_prompt=True) if i else ""
            upto = full if i == len(messages) - 1 else self.template(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(
                    "the chat template does not render conversations by appending turns, so assistant tokens "
                    "cannot be located; use a model whose template does, or data.loss_on: all"
                )
            spans.append((len(before), len(upto)))
        return spans

    def tokenize_batch(
        self,
        conversations: list[list[dict[str, str]]],
        max_length: int,
        loss_on: str = "assistant",
        overlong: str = "truncate",
    ) -> list[Tokenized]:
        """Token ids and labels (IGNORE outside loss spans) for a batch of conversations.

        A conversation longer than `max_length` tokens is, with `overlong: truncate`, cut after the last assistant
        reply that fits (loss stays on the replies kept, `last` meaning the last one kept); plain text is cut at
        `max_length`. One whose first reply does not fit, or any with `overlong: reject`, comes back `too_long`.
        One the chat template refuses (many raise on roles that do not alternate, or on a system turn) or renders
        in a way that hides its replies comes back `template_error`, with the template's message.
        """
        renderings = [self._render_or_refuse(turns, loss_on) for turns in conversations]
        encodings = iter(self.encode([r.text for r in renderings if isinstance(r, Rendering)]))
        out = []
        for r in renderings:
            if isinstance(r, Tokenized):  # refused
                out.append(r)
                continue
            ids, at = next(encodings)
            n, problem, detail, spans = len(ids), "", "", r.spans
            if n > max_length:
                if overlong == "reject":
                    out.append(Tokenized([], [], "too_long", f"{n} tokens, over data.max_length {max_length}"))
                    continue
                if r.replies is None:
                    keep = max_length
                else:
                    # tokens that end by each reply's end; the cut is the last reply that fits
                    ends = [at.ending_by(hi) for _, hi in r.replies]
                    fitting = [(k, reply) for k, reply in zip(ends, r.replies) if k <= max_length]
                    if not fitting:
                        out.append(
                            Tokenized(
                                [],
                                [],
                                "too_long",
                                f"its first reply ends at token {ends[0]}, over "
                                f"data.max_length {max_length}; cannot cut at a turn",
                            )
                        )
                        continue
                    keep, last_kept = fitting[-1]
                    if loss_on == "last":
                        spans = [last_kept]
                ids = ids[:keep]
                problem, detail = "truncated", f"{n} tokens cut to {keep}"
            # a token carries loss when it starts inside a span
            labels = [IGNORE] * len(ids)
            for lo, hi in spans:
                first, end = at.starting_from(lo), at.starting_from(hi)
                labels[first:end] = ids[first:end]
            out.append(Tokenized(ids, labels, problem, detail))
        return out

    def _render_or_refuse(self, turns: Sequence[dict[str, str]], loss_on: str) -> "Rendering | Tokenized":
        try:
            return self.render(turns, loss_on)
        except Exception as exc:  # the template's own raise_exception, or any other error inside the template
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return Tokenized([], [], "template_error", f"the model's chat template refused it: {message}")


class OffsetPositions:
    """Where tokens sit, from their (start, end) character offsets (in text order)."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.offsets = offsets

    def starting_from(self, char: int) -> int:
        """The index of the first token that starts at or after `char` (the token count if none)."""
        return bisect.bisect_left(self.offsets, (char, -1))

    def ending_by(self, char: int) -> int:
        """How many tokens end at or before `char`."""
        return bisect.bisect_right([end for _, end in self.offsets], char)


class EncodingPositions:
    """The same, asked of a Rust `Encoding` a few characters at a time (its full offset list, as Python tuples,
    costs a sixth of the tokenization on long texts)."""

    def __init__(self, encoding, length: int):
        self.encoding, self.length, self.n = encoding, length, len(encoding)

    def starting_from(self, char: int) -> int:
        while char < self.length:
            token = self.encoding.char_to_token(char)
            if token is not None:  # the token holding `char`, or the next if it began before
                return token if self.encoding.token_to_chars(token)[0] >= char else token + 1
            char += 1  # a character no token covers (a normaliser dropped it)
        return self.n

    def ending_by(self, char: int) -> int:
        count = self.starting_from(char)  # every token before it starts before `char`...
        while count and self.encoding.token_to_chars(count - 1)[1] > char:
            count -= 1  # ...but may run past it
        return count


def _compiled_template(tokenizer) -> Callable[[list[dict[str, Any]], bool], str] | None:
    """The chat template compiled once by transformers' own compiler and rendered with the variables
    `apply_chat_template` gives it, if that renders the sample conversation exactly as `apply_chat_template`."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
        # Template.render less what it repeats on every call: copying the template's globals (a ChainMap) into
        # the context, 60% of rendering a short conversation. They are merged with the constant variables once;
        # each rendering's context shares a fresh dict of them (jinja's `shared` context: passed as is)
        constant = {**compiled.globals, "tools": None, "documents": None, **tokenizer.special_tokens_map}
        concat = compiled.environment.concat

        def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
            context = compiled.new_context(
                {**constant, "messages": messages, "add_generation_prompt": add_generation_prompt}, shared=True
            )
            return concat(compiled.root_render_func(context))

        compared = 0
        for messages in (_SAMPLE, _SAMPLE[1:]):
            try:  # some templates refuse a system turn
                expected = [
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                    for prompt in (False, True)
                ]
            except Exception:
                continue
            if [render(messages, prompt) for prompt in (False, True)] != expected:
                return None
            compared += 1
        return render if compared else None
    except Exception:  # no such compiler in this transformers, or a template that fails apart from it
        return None


def _backend_encoder(tokenizer) -> Callable[[list[str]], list] | None:
    """The fast tokenizer's Rust backend, set up the way the tokenizer's own call sets it (no truncation or
    padding, its special-token splitting), if it encodes the sample exactly as the tokenizer does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    sample = ["<|x|> Hello, wörld!  你好\n\tend", _SAMPLE[2]["content"]]
    expected = tokenizer(sample, add_special_tokens=False, return_offsets_mapping=True)  # also sets the backend up

    def encode(texts: list[str]) -> list:
        return backend.encode_batch(texts, add_special_tokens=False)

    got = encode(sample)
    if [e.ids for e in got] != expected["input_ids"] or [e.offsets for e in got] != [
        [tuple(o) for o in x] for x in expected["offset_mapping"]
    ]:
        return None
    return encode


_SAMPLE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


def check_tokenizer(tokenizer, name: str, loss_on: str = "assistant") -> None:
    """Fail early, with the reason, if masking cannot work with this tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"tokenizer of {name} is not a fast tokenizer; character offsets are needed for masking")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer of {name} has no chat_template; add one or use data.format: text")
    chat = ChatTokenizer(tokenizer)
    try:
        chat.render(_SAMPLE, loss_on)
    except TemplateError as exc:
        raise TemplateError(f"{name}: {exc}") from None
    except Exception as exc:  # a template that rejects system turns etc. is still usable without them
        try:
            chat.render(_SAMPLE[1:], loss_on)
        except TemplateError as inner:
            raise TemplateError(f"{name}: {inner}") from None
        except Exception:
            raise TemplateError(f"{name}: its chat template fails on a plain conversation: {exc}") from None
