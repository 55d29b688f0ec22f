"""The demo data: real conversations from the `chatterbot-corpus` package, written as `messages` JSON Lines.

Each chatterbot conversation is a list of utterances by two speakers taking turns; the first speaker becomes
`user`, the second `assistant`, alternating. Conversations with fewer than two utterances (nothing to answer)
are skipped. Every scalar is read as text (YAML's BaseLoader), so "Yes" stays "Yes", not `true`.
"""

import glob
import json
import os

import yaml

LANGUAGES = ("english", "chinese")


def corpus_dir() -> str:
    import chatterbot_corpus

    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def conversations(languages=LANGUAGES):
    """(language, topic, [utterances]) for every usable conversation, in a stable order."""
    for language in languages:
        for path in sorted(glob.glob(os.path.join(corpus_dir(), language, "*.yml"))):
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=yaml.BaseLoader) or {}
            topic = os.path.splitext(os.path.basename(path))[0]
            for conv in doc.get("conversations", []):
                if not isinstance(conv, list):
                    continue
                utterances = [u.strip() for u in conv if isinstance(u, str) and u.strip()]
                if len(utterances) >= 2:
                    yield language, topic, utterances


def to_messages(utterances: list[str]) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(utterances)]


def write_demo_data(out_path: str, languages=LANGUAGES) -> int:
    """Write the corpus as `messages` JSON Lines to `out_path`; returns the number of conversations."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    count = 0
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for language, topic, utterances in conversations(languages):
            record = {"messages": to_messages(utterances), "language": language, "topic": topic}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, out_path)  # never leave a half-written file behind
    return count
