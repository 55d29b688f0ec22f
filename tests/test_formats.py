import json

import pytest

from pipelines.dataset import parse_batch, split_of
from pipelines.formats import Reject, detect_format, normalize


def test_each_format_normalises_to_turns():
    assert normalize(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"
    ) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert normalize(
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"
    ) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    # ShareGPT-style data that spells its turns {"role", "content"}
    assert normalize(
        {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "sharegpt"
    ) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(Reject, match="unknown_role: conversations.1..role='bot'"):
        normalize({"conversations": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "sharegpt")
    assert normalize({"instruction": "do", "input": "this", "output": "done"}, "alpaca") == [
        {"role": "user", "content": "do\n\nthis"},
        {"role": "assistant", "content": "done"},
    ]
    assert normalize({"text": "hello"}, "text") == [{"role": "text", "content": "hello"}]


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "wrong_shape"),
        ({"messages": "hi"}, "wrong_shape"),
        ({"messages": "[" * 100_000 + "]" * 100_000}, "wrong_shape"),  # a CSV cell of JSON nested too deep to parse
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_shape"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn"),
    ],
)
def test_rejects_name_their_reason(record, reason):
    with pytest.raises(Reject) as err:
        normalize(record, "messages")
    assert err.value.reason == reason


def test_cleaning_normalises_unicode_and_strips_control_characters():
    turns = normalize(
        {"messages": [{"role": "user", "content": "Cafe\u0301\x07 ok\n"}, {"role": "assistant", "content": "yes\tno"}]},
        "messages",
    )
    assert turns[0]["content"] == "Caf\u00e9 ok\n"
    assert turns[1]["content"] == "yes\tno"


def test_detect_format():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    assert detect_format({"text": ""}) == "text"
    assert detect_format({"other": 1}) is None


def test_split_is_stable_and_near_80_10_10():
    convs = [json.dumps([{"role": "user", "content": f"q{i}"}]) for i in range(20000)]
    first = [split_of(c, 0.1, 0.1, 42) for c in convs]
    assert first == [split_of(c, 0.1, 0.1, 42) for c in reversed(convs)][::-1]  # order does not matter
    share = {s: first.count(s) / len(first) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.01)
    assert share["val"] == pytest.approx(0.1, abs=0.01)
    assert share["test"] == pytest.approx(0.1, abs=0.01)
    assert [split_of(c, 0.1, 0.1, 7) for c in convs] != first  # the seed draws another split


def test_parse_batch_keeps_every_line_with_its_reason():
    import pyarrow as pa

    raws = [
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        b'{"messages": [',
        b"\xff\xfe",
        b'{"messages": [{"role": "user", "content": "a"}]}',
        # valid UTF-8, but the JSON escapes half a surrogate pair: no Unicode text (nor a tokenizer) takes it
        b'{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ]  # deeper than Python's parser recurses
    batch = pa.table({"source": ["f.jsonl"] * 6, "line": [1, 2, 3, 5, 6, 7], "raw": pa.array(raws, pa.binary())})
    out = parse_batch(batch, {"f.jsonl": "messages"}, 0.1, 0.1, 42).to_pylist()
    assert [r["reject"] for r in out] == [
        "",
        "unparsable",
        "invalid_utf8",
        "no_assistant_turn",
        "invalid_utf8",
        "unparsable",
    ]
    assert out[4]["detail"] == "lone surrogate '\\ud800' (escaped in the JSON) is not valid Unicode"
    assert out[4]["record"] == raws[4].decode()
    assert out[5]["detail"] == "nested too deeply"
    assert [r["line"] for r in out] == [1, 2, 3, 5, 6, 7]
    assert out[0]["split"] in ("train", "val", "test") and out[1]["split"] == ""
    assert json.loads(out[0]["conversation"])[1] == {"role": "assistant", "content": "b"}
