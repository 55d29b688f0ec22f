import json

from pipelines.corpus import to_messages, write_demo_data


def test_turns_alternate_user_assistant():
    assert to_messages(["a", "b", "c"]) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_demo_data_has_english_and_chinese_conversations(tmp_path):
    out = tmp_path / "chat.jsonl"
    n = write_demo_data(str(out))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) > 2000
    assert {r["language"] for r in rows} == {"english", "chinese"}
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    assert all(isinstance(m["content"], str) and m["content"] for r in rows for m in r["messages"])


def test_yaml_scalars_stay_text_and_short_conversations_are_skipped(tmp_path, monkeypatch):
    import pipelines.corpus as corpus

    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "t.yml").write_text(
        "conversations:\n- - Are you a robot?\n  - Yes\n- - alone\n- - 1.50\n  - 'on'\n  - off\n"
    )
    monkeypatch.setattr(corpus, "corpus_dir", lambda: str(tmp_path))
    got = [u for _, _, u in corpus.conversations(("english",))]
    assert got == [["Are you a robot?", "Yes"], ["1.50", "on", "off"]]
