"""Chat-template rendering and loss masking, checked token by token on the project's own tiny model."""

import pytest
from hypothesis import given, settings, strategies as st

from pipelines.chat import IGNORE, TemplateError, check_tokenizer, render, tokenize_batch

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


def pieces(tokenizer, ids, labels):
    """(token text, has loss) pairs."""
    return [(tokenizer.decode([i]), l != IGNORE) for i, l in zip(ids, labels)]


def test_loss_only_on_assistant_replies_and_their_end_marker(tokenizer):
    ids, labels = tokenize_batch(tokenizer, [CONV], max_length=512)
    got = pieces(tokenizer, ids[0], labels[0])
    trained = "".join(text for text, on in got if on)
    assert trained == "Hello! 你好<|end|>\nGoodbye.<|end|>\n"
    untrained = "".join(text for text, on in got if not on)
    assert untrained == ("<|begin|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
                         "<|user|>\nBye<|end|>\n<|assistant|>\n")
    # labels are the token ids themselves where trained
    assert all(l == i for i, l in zip(ids[0], labels[0]) if l != IGNORE)


def test_loss_on_all_tokens(tokenizer):
    ids, labels = tokenize_batch(tokenizer, [CONV], max_length=512, loss_on="all")
    assert labels[0] == ids[0]


def test_text_records_train_on_everything_and_end_with_eos(tokenizer):
    ids, labels = tokenize_batch(tokenizer, [[{"role": "text", "content": "plain words"}]], max_length=512)
    assert labels[0] == ids[0]
    assert ids[0][-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_start(tokenizer):
    full, _ = tokenize_batch(tokenizer, [CONV], max_length=512)
    ids, labels = tokenize_batch(tokenizer, [CONV], max_length=20)
    assert ids[0] == full[0][:20]
    assert len(labels[0]) == 20


def test_spans_cover_each_reply(tokenizer):
    text, spans = render(tokenizer, CONV)
    assert [text[a:b] for a, b in spans] == ["Hello! 你好<|end|>\n", "Goodbye.<|end|>\n"]


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
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30).filter(str.strip),
                          st.text(min_size=1, max_size=30).filter(str.strip)), min_size=1, max_size=4))
def test_masking_property(tokenizer, turns):
    """For any conversation, the trained tokens decode to exactly the replies, each with its end marker."""
    from pipelines.formats import clean_text

    conv = []
    for question, answer in turns:
        conv += [{"role": "user", "content": clean_text(question)}, {"role": "assistant", "content": clean_text(answer)}]
    ids, labels = tokenize_batch(tokenizer, [conv], max_length=4096)
    trained = [i for i, l in zip(ids[0], labels[0]) if l != IGNORE]
    expected = "".join(m["content"] + "<|end|>\n" for m in conv if m["role"] == "assistant")
    assert tokenizer.decode(trained) == expected
