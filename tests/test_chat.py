"""Chat-template rendering and loss masking, checked token by token on the project's own tiny model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.chat import IGNORE, ChatTokenizer, OffsetPositions, TemplateError, check_tokenizer
from pipelines.formats import clean_text

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


def pieces(tokenizer, ids, labels):
    """(token text, has loss) pairs."""
    return [(tokenizer.decode([i]), label != IGNORE) for i, label in zip(ids, labels)]


def one(tokenizer, conv, **kwargs):
    """(input_ids, labels) of one conversation."""
    out = ChatTokenizer(tokenizer).tokenize_batch([conv], **{"max_length": 512, **kwargs})[0]
    return out.input_ids, out.labels


def test_loss_only_on_assistant_replies_and_their_end_marker(tokenizer):
    ids, labels = one(tokenizer, CONV)
    got = pieces(tokenizer, ids, labels)
    trained = "".join(text for text, on in got if on)
    assert trained == "Hello! 你好<|end|>\nGoodbye.<|end|>\n"
    untrained = "".join(text for text, on in got if not on)
    assert untrained == (
        "<|begin|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n"
    )
    # labels are the token ids themselves where trained
    assert all(label == i for i, label in zip(ids, labels) if label != IGNORE)


def test_loss_on_all_tokens(tokenizer):
    ids, labels = one(tokenizer, CONV, loss_on="all")
    assert labels == ids


def test_loss_on_last_reply_only(tokenizer):
    ids, labels = one(tokenizer, CONV, loss_on="last")
    assert "".join(t for t, on in pieces(tokenizer, ids, labels) if on) == "Goodbye.<|end|>\n"


def test_text_records_train_on_everything_and_end_with_eos(tokenizer):
    ids, labels = one(tokenizer, [{"role": "text", "content": "plain words"}])
    assert labels == ids
    assert ids[-1] == tokenizer.eos_token_id


def test_overlong_conversation_is_cut_after_the_last_reply_that_fits(tokenizer):
    full_ids, full_labels = one(tokenizer, CONV)
    first_reply = one(tokenizer, CONV[:3])[0]  # system, user, first reply
    assert len(first_reply) < len(full_ids)
    out = ChatTokenizer(tokenizer).tokenize_batch([CONV], max_length=len(full_ids) - 1)[0]
    assert out.problem == "truncated" and out.detail == f"{len(full_ids)} tokens cut to {len(first_reply)}"
    assert out.input_ids == first_reply == full_ids[: len(first_reply)]
    assert out.labels == full_labels[: len(first_reply)]
    assert tokenizer.decode(out.input_ids).endswith("Hello! 你好<|end|>\n")
    # loss_on last means the last reply kept
    last = ChatTokenizer(tokenizer).tokenize_batch([CONV], max_length=len(full_ids) - 1, loss_on="last")[0]
    assert "".join(t for t, on in pieces(tokenizer, last.input_ids, last.labels) if on) == "Hello! 你好<|end|>\n"


def test_overlong_conversation_whose_first_reply_does_not_fit_is_rejected(tokenizer):
    first_reply = one(tokenizer, CONV[:3])[0]
    out = ChatTokenizer(tokenizer).tokenize_batch([CONV], max_length=len(first_reply) - 1)[0]
    assert (out.problem, out.input_ids, out.labels) == ("too_long", [], [])
    assert out.detail == (
        f"its first reply ends at token {len(first_reply)}, over data.max_length "
        f"{len(first_reply) - 1}; cannot cut at a turn"
    )


def test_overlong_reject_mode_and_text_truncation(tokenizer):
    ids, _ = one(tokenizer, CONV)
    out = ChatTokenizer(tokenizer).tokenize_batch([CONV], max_length=len(ids) - 1, overlong="reject")[0]
    assert out.problem == "too_long" and out.detail == f"{len(ids)} tokens, over data.max_length {len(ids) - 1}"
    text = [{"role": "text", "content": "many plain words " * 20}]
    full, _ = one(tokenizer, text)
    cut = ChatTokenizer(tokenizer).tokenize_batch([text], max_length=10)[0]
    assert cut.problem == "truncated" and cut.input_ids == full[:10] == cut.labels


def test_spans_cover_each_reply(tokenizer):
    r = ChatTokenizer(tokenizer).render(CONV)
    assert [r.text[a:b] for a, b in r.spans] == ["Hello! 你好<|end|>\n", "Goodbye.<|end|>\n"]
    assert r.replies == r.spans


def test_template_that_rewrites_history_is_refused(tokenizer):
    class Rewriting:
        is_fast = True
        chat_template = "x"
        eos_token = "</s>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            # renders the turn count first, so earlier renderings are not prefixes of later ones
            return f"{len(messages)}:" + "|".join(m["content"] for m in messages)

    with pytest.raises(TemplateError, match="does not render conversations by appending"):
        check_tokenizer(Rewriting(), "weird-model")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            # what the pipeline keeps: text not empty once cleaned (else it is an empty_content reject)
            st.text(min_size=1, max_size=30).filter(lambda s: clean_text(s).strip()),
            st.text(min_size=1, max_size=30).filter(lambda s: clean_text(s).strip()),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_masking_property(tokenizer, turns):
    """For any conversation, the trained tokens decode to exactly the replies, each with its end marker."""

    conv = []
    for question, answer in turns:
        conv += [
            {"role": "user", "content": clean_text(question)},
            {"role": "assistant", "content": clean_text(answer)},
        ]
    ids, labels = one(tokenizer, conv, max_length=4096)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE]
    expected = "".join(m["content"] + "<|end|>\n" for m in conv if m["role"] == "assistant")
    assert tokenizer.decode(trained) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=5), st.booleans())
def test_compiled_template_and_rust_backend_give_what_transformers_gives(tokenizer, contents, prompt):
    """ChatTokenizer's shortcuts (template compiled once, the Rust backend called directly) are taken for the
    project's tokenizer and agree with apply_chat_template and the tokenizer's own call on any conversation."""

    chat = ChatTokenizer(tokenizer)
    assert chat._render is not None and chat._encode is not None
    conv = [{"role": ("user", "assistant")[i % 2], "content": clean_text(c)} for i, c in enumerate(contents)]
    text = chat.template(conv, add_generation_prompt=prompt)
    assert text == tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt)
    texts = [text, contents[0]]
    expected = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for (ids, at), t, want_ids, offsets in zip(
        chat.encode(texts), texts, expected["input_ids"], expected["offset_mapping"]
    ):
        assert ids == want_ids
        # token positions asked of the Rust encoding agree with the offsets transformers gives, at every character
        want = OffsetPositions([tuple(o) for o in offsets])
        for char in range(len(t) + 1):
            assert at.starting_from(char) == want.starting_from(char)
            assert at.ending_by(char) == want.ending_by(char)


# the guard Mistral's and Llama 2's templates open with (Gemma's refuses a system turn the same way)
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% endfor %}"
)


def test_a_conversation_the_template_refuses_is_that_conversation_s_problem_only(tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ALTERNATING + tokenizer.chat_template
    chat = ChatTokenizer(strict)
    assert chat._render is not None  # the compiled template raises just as apply_chat_template does
    fine = [CONV[1:3], CONV[1:]]
    twice = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}, CONV[2]]
    out = chat.tokenize_batch([fine[0], twice, CONV, fine[1]], max_length=512)
    assert [t.problem for t in out] == ["", "template_error", "template_error", ""]
    assert out[1].detail == (
        "the model's chat template refused it: Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert out[1].input_ids == out[1].labels == []
    expected = ChatTokenizer(tokenizer).tokenize_batch(fine, max_length=512)
    assert [(t.input_ids, t.labels) for t in (out[0], out[3])] == [(t.input_ids, t.labels) for t in expected]


def test_a_template_that_renders_differently_when_compiled_apart_goes_through_transformers(tokenizer):
    """A tokenizer whose apply_chat_template adds variables of its own (here: a date) is not second-guessed."""
    import copy

    dated = copy.deepcopy(tokenizer)
    dated.chat_template = "{{ today }}" + tokenizer.chat_template
    original = type(dated).apply_chat_template
    dated.apply_chat_template = lambda messages, **kw: original(dated, messages, today="2026-11-28", **kw)
    chat = ChatTokenizer(dated)
    assert chat._render is None
    assert chat.render(CONV).text.startswith("2026-11-28<|begin|>")
