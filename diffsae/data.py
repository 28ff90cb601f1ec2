"""Load prompts (JSONL or Parquet) into tokenized documents with a role per token.

A row has `messages` (a list of {role, content}, role in system/user/assistant) or `text`, plus optional `id` and
`behaviour` (a ground-truth label; absent or null -> "none"). Conversations are rendered with the tokenizer's chat
template; the same token ids feed both models. Every token gets a role: the role of the message whose content it
overlaps, "template" for the chat markup (BOS, role markers), "text" for plain-text rows.

    docs = load_docs("prompts.jsonl", tokenizer, max_tokens_per_doc=256, max_docs=None)
    docs[0].token_ids[:5], docs[0].roles[:5]

Malformed rows raise `DataError` with the file and line (JSONL) or row (Parquet) number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A problem with the prompts file, reported as one line naming the file and line."""


class Doc(NamedTuple):
    doc_id: int  # 0..N-1 in file order
    id: str  # the row's `id`, default str(doc_id)
    text: str  # rendered text (chat template applied for conversations)
    behaviour: str  # ground-truth label, "none" for ordinary rows
    token_ids: list[int]  # starts with BOS (when the tokenizer has one), at most max_tokens_per_doc
    roles: list[str]  # per token: system / user / assistant / template / text


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; location is `file:line` (JSONL) or `file row N` (Parquet, 1-based)."""
    if _is_parquet(path):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", row
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield where, row


def _check_row(where: str, row: Any) -> tuple[list[dict[str, str]] | None, str | None, str | None, str]:
    """Validate one row: (messages, text, id, behaviour)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    messages, text = row.get("messages"), row.get("text")
    if messages is None and text is None:
        raise DataError(f"{where}: row has neither `messages` nor `text`")
    if messages is not None and text is not None:
        raise DataError(f"{where}: row has both `messages` and `text`")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: `text` must be a string, got {type(text).__name__}")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: `messages` must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with `role` and `content`")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} (expected {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
    rid = row.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise DataError(f"{where}: `id` must be a string or integer, got {type(rid).__name__}")
    beh = row.get("behaviour")
    if beh is not None and not isinstance(beh, str):
        raise DataError(f"{where}: `behaviour` must be a string or null, got {type(beh).__name__}")
    msgs = None if messages is None else [{"role": m["role"], "content": m["content"]} for m in messages]
    return msgs, text, None if rid is None else str(rid), beh or "none"


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def _render_chat(where: str, tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int, str]]]:
    """Rendered text and the (start, end, role) character span of each message's content in it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: row has `messages` but the tokenizer has no chat template")
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) become one line
        raise DataError(f"{where}: chat template failed: {' '.join(str(e).split())}") from None
    spans: list[tuple[int, int, str]] = []
    cursor = 0
    for m in messages:
        content = m["content"]
        for candidate in (content, content.strip()):
            start = rendered.find(candidate, cursor) if candidate else -1
            if start >= 0:
                spans.append((start, start + len(candidate), m["role"]))
                cursor = start + len(candidate)
                break
    return rendered, spans


def _roles_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int, str]]) -> list[str]:
    roles = []
    j = 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        role = "template"
        if j < len(spans) and start < spans[j][1] and end > spans[j][0] and end > start:
            role = spans[j][2]
        roles.append(role)
    return roles


def encode_row(
    where: str, tokenizer: Any, messages: list[dict[str, str]] | None, text: str | None
) -> tuple[str, list[int], list[str]]:
    """(rendered text, token ids starting with BOS, roles) of one validated row (untruncated)."""
    if messages is not None:
        rendered, spans = _render_chat(where, tokenizer, messages)
    else:
        assert text is not None
        rendered, spans = text, [(0, len(text), "text")]
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    roles = _roles_from_offsets([tuple(o) for o in enc["offset_mapping"]], spans)
    bos = _bos(tokenizer)
    if bos and (not ids or ids[0] != bos[0]):
        ids, roles = bos + ids, ["template"] + roles
    return rendered, ids, roles


def load_docs(path: str | Path, tokenizer: Any, max_tokens_per_doc: int, max_docs: int | None = None) -> list[Doc]:
    """Read, validate, render and tokenize the documents of a JSONL or Parquet file (first `max_docs`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if max_tokens_per_doc < 2:
        raise DataError(f"max_tokens_per_doc must be >= 2, got {max_tokens_per_doc}")
    docs: list[Doc] = []
    for where, row in _rows(p):
        if max_docs is not None and len(docs) >= max_docs:
            break
        messages, text, rid, behaviour = _check_row(where, row)
        rendered, ids, roles = encode_row(where, tokenizer, messages, text)
        if len(ids) < 2:
            raise DataError(f"{where}: document has fewer than 2 tokens")
        doc_id = len(docs)
        docs.append(
            Doc(
                doc_id=doc_id,
                id=rid if rid is not None else str(doc_id),
                text=rendered,
                behaviour=behaviour,
                token_ids=ids[:max_tokens_per_doc],
                roles=roles[:max_tokens_per_doc],
            )
        )
    if not docs:
        raise DataError(f"{p}: no documents")
    return docs


def docs_have_messages(path: str | Path) -> bool:
    """Whether any row has `messages` (Parquet: the column exists; JSONL: a line has the key), without tokenizing."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if _is_parquet(p):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(p)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{p}: not a readable Parquet file: {e}") from None
        if "messages" not in schema.names:
            return False
        col = pq.read_table(p, columns=["messages"]).column("messages")
        return col.null_count < len(col)
    with open(p, encoding="utf-8") as f:
        for line in f:
            if '"messages"' not in line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # reported by load_docs with its line number
            if isinstance(row, dict) and row.get("messages") is not None:
                return True
    return False


def data_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
