"""diffsae.data: JSONL + Parquet, messages + text rows, per-token roles, truncation, malformed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffsae.data import DataError, data_fingerprint, docs_have_messages, load_docs
from organisms.demo_train import build_tokenizer

CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"

ROWS = [
    {
        "id": "a",
        "behaviour": "refusal",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the moon?"},
            {"role": "assistant", "content": "A rock that goes round the earth."},
        ],
    },
    {"text": "Once upon a time, there was a king.", "behaviour": None},
    {
        "id": 7,
        "messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}],
    },
]


@pytest.fixture(scope="module")
def tok():
    text = [r.get("text") or " ".join(m["content"] for m in r["messages"]) for r in ROWS] * 30
    return build_tokenizer(text + ["The quick brown fox jumps over the lazy dog."] * 30, 300)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def _decode_role(tok, doc, role: str) -> str:
    return tok.decode([t for t, r in zip(doc.token_ids, doc.roles) if r == role])


def test_jsonl_messages_and_text(tmp_path, tok):
    docs = load_docs(_jsonl(tmp_path / "p.jsonl", ROWS), tok, max_tokens_per_doc=256)
    assert [d.doc_id for d in docs] == [0, 1, 2]
    assert [d.id for d in docs] == ["a", "1", "7"]
    assert [d.behaviour for d in docs] == ["refusal", "none", "none"]
    chat = docs[0]
    assert chat.text == tok.apply_chat_template(ROWS[0]["messages"], tokenize=False)
    assert chat.token_ids[0] == tok.bos_token_id and chat.token_ids.count(tok.bos_token_id) == 1
    assert len(chat.roles) == len(chat.token_ids)
    assert set(chat.roles) == {"template", "system", "user", "assistant"}
    assert _decode_role(tok, chat, "system") == "Be brief."
    assert _decode_role(tok, chat, "user") == "What is the moon?"
    assert _decode_role(tok, chat, "assistant") == "A rock that goes round the earth."
    # the chat markup (BOS, role markers, <|end|>) is "template"
    assert {tok.convert_ids_to_tokens(t) for t, r in zip(chat.token_ids, chat.roles) if r == "template"} == {
        "<|bos|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    }
    text = docs[1]
    assert text.text == ROWS[1]["text"]
    assert text.token_ids[0] == tok.bos_token_id and text.roles == ["template"] + ["text"] * (len(text.roles) - 1)
    assert tok.decode(text.token_ids[1:]) == ROWS[1]["text"]


def test_parquet_matches_jsonl(tmp_path, tok):
    a = load_docs(_jsonl(tmp_path / "p.jsonl", ROWS), tok, 256)
    rows = [dict(r, id=str(r["id"])) if "id" in r else r for r in ROWS]
    b = load_docs(_parquet(tmp_path / "p.parquet", rows), tok, 256)
    assert a == b


def test_other_chat_template_roles(tmp_path, tok):
    """A ChatML-like template (markers as plain text, newlines): content spans still get their roles."""
    tok2 = build_tokenizer(["hello"] * 10, 300)
    tok2.chat_template = CHATML
    doc = load_docs(_jsonl(tmp_path / "p.jsonl", [ROWS[2]]), tok2, 256)[0]
    assert doc.text.startswith("<|im_start|>user\nHello there<|im_end|>")
    assert _decode_role(tok2, doc, "user").strip() == "Hello there"
    assert _decode_role(tok2, doc, "assistant").strip() == "Hi!"
    assert doc.roles[0] == "template" and doc.token_ids[0] == tok2.bos_token_id  # BOS prepended


def test_truncation_and_max_docs(tmp_path, tok):
    docs = load_docs(_jsonl(tmp_path / "p.jsonl", ROWS), tok, max_tokens_per_doc=5, max_docs=2)
    assert len(docs) == 2
    for d in docs:
        assert len(d.token_ids) == len(d.roles) == 5
        assert d.token_ids[0] == tok.bos_token_id


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ('{"text": "ok", ', r"p\.jsonl:3: invalid JSON"),
        ({"id": "x"}, r"p\.jsonl:3: row has neither `messages` nor `text`"),
        ({"text": 5}, r"p\.jsonl:3: `text` must be a string, got int"),
        ({"messages": "hi"}, r"p\.jsonl:3: `messages` must be a non-empty list"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            r"p\.jsonl:3: messages\[0\] has unknown role 'robot'",
        ),
        (
            {"messages": [{"role": "user"}]},
            r"p\.jsonl:3: messages\[0\] must be an object with `role` and `content`",
        ),
        (
            {"messages": [{"role": "user", "content": 1}]},
            r"p\.jsonl:3: messages\[0\]\.content must be a string",
        ),
        ({"text": "x", "behaviour": 3}, r"p\.jsonl:3: `behaviour` must be a string or null"),
        ([1, 2], r"p\.jsonl:3: a row must be an object, got list"),
    ],
)
def test_malformed_jsonl_names_line(tmp_path, tok, bad, pattern):
    path = _jsonl(tmp_path / "p.jsonl", [ROWS[1], "", bad, ROWS[1]])  # line 2 is blank: skipped, still counted
    with pytest.raises(DataError, match=pattern) as err:
        load_docs(path, tok, 64)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_malformed_parquet_names_row(tmp_path, tok):
    rows = [{"text": "fine", "messages": None}, {"text": None, "messages": None}]
    with pytest.raises(DataError, match=r"p\.parquet row 2: row has neither"):
        load_docs(_parquet(tmp_path / "p.parquet", rows), tok, 64)


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(DataError, match="data file not found"):
        load_docs(tmp_path / "nope.jsonl", tok, 64)
    with pytest.raises(DataError, match="no documents"):
        load_docs(_jsonl(tmp_path / "e.jsonl", []), tok, 64)


def test_messages_need_chat_template(tmp_path):
    tok = build_tokenizer(["hello there"] * 10, 300)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"p\.jsonl:1: row has `messages` but the tokenizer has no chat template"):
        load_docs(_jsonl(tmp_path / "p.jsonl", [ROWS[2]]), tok, 64)
    assert load_docs(_jsonl(tmp_path / "t.jsonl", [ROWS[1]]), tok, 64)[0].roles[1] == "text"


def test_docs_have_messages(tmp_path):
    assert docs_have_messages(_jsonl(tmp_path / "a.jsonl", ROWS))
    assert not docs_have_messages(_jsonl(tmp_path / "b.jsonl", [ROWS[1], {"text": 'say "messages"'}]))
    assert docs_have_messages(_parquet(tmp_path / "a.parquet", [dict(r, id=str(r.get("id"))) for r in ROWS]))
    assert not docs_have_messages(_parquet(tmp_path / "b.parquet", [ROWS[1]]))


def test_data_fingerprint(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ROWS)
    fp = data_fingerprint(a)
    assert fp == data_fingerprint(_jsonl(tmp_path / "b.jsonl", ROWS))
    assert fp != data_fingerprint(_jsonl(tmp_path / "c.jsonl", ROWS[:2]))
