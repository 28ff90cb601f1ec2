"""Parquet layout of the activations stage: shards, their sidecars, the manifest, docs and tokens tables.

    <run>/activations/shard-00000.parquet   rows: doc_id, pos, token_id, token, role, kl, in_sae, diff[, base, ft]
                                            [, h_base, h_ft, x_ft]
    <run>/activations/shard-00000.json      sidecar: the shard's record (written right after the shard)
    <run>/activations/docs.parquet          doc_id, id, text, behaviour, n_tokens
    <run>/activations/tokens.parquet        doc_id, pos, token_id, token, role, kl (projection of the shards)
    <run>/activations/manifest.json         per shard: doc range, rows, bytes, sha256; committed LAST

A shard is valid when its sidecar exists and the file's size and sha256 match it. `ShardWriter` converts batches
to Arrow and writes them on a background thread, so device compute overlaps Parquet encoding.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffsae.data import Doc
from storage import schemas
from storage.paths import RunPaths
from storage.store import Store

TOKEN_COLUMNS = schemas.TOKENS.names  # the tokens table is this projection of the shards


class ShardRecord(NamedTuple):
    index: int
    file: str  # file name relative to the activations folder
    doc_start: int  # first doc_id (inclusive)
    doc_end: int  # last doc_id (exclusive)
    rows: int
    bytes: int
    sha256: str
    key: str  # hash of everything the shard was computed from


def _fixed_list(arr_ND: np.ndarray, typ: pa.DataType) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(arr_ND).reshape(-1), type=typ.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, arr_ND.shape[1])


def _rows(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<T>[d] column as a numpy [n, d] array of T (the inverse of `_fixed_list`)."""
    col = column.combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def batch_to_arrow(batch: Any, schema: pa.Schema, token_strings: Sequence[str]) -> pa.RecordBatch:
    """An diffsae.extract.ExtractBatch as an Arrow record batch of `schema`."""
    values = {
        "doc_id": batch.doc_id_N,
        "pos": batch.pos_N,
        "token_id": batch.token_id_N,
        "token": [token_strings[t] for t in batch.token_id_N.tolist()],
        "role": batch.role_N,
        "kl": batch.kl_N,
        "in_sae": batch.in_sae_N,
    }
    cols = [pa.array(values[f.name], f.type) for f in schemas.SHARD_PREFIX]
    cols.append(_fixed_list(batch.diff_ND, schema.field("diff").type))
    if batch.base_ND is not None:
        cols += [
            _fixed_list(batch.base_ND, schema.field("base").type),
            _fixed_list(batch.ft_ND, schema.field("ft").type),
        ]
    if batch.states_N3D is not None:
        cols += [_fixed_list(batch.states_N3D[:, i], schema.field(n).type) for i, n in enumerate(schemas.STATE_COLUMNS)]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Write Arrow batches of one shard on a background thread; `close()` commits the shard atomically."""

    def __init__(
        self, store: Store, paths: RunPaths, index: int, schema: pa.Schema, token_strings: Sequence[str]
    ):
        self.store, self.paths, self.index, self.schema = store, paths, index, schema
        self.token_strings = token_strings
        self.rows = 0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._aborting = False  # abort(): the thread skips what is queued, then stops
        self._ctx = store.writing(paths.shard(index), "application/vnd.apache.parquet")
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self._thread = threading.Thread(target=self._run, name=f"shard-writer-{index}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None or self._aborting:
                continue
            try:
                rb = batch_to_arrow(item, self.schema, self.token_strings)
                self._writer.write_batch(rb, row_group_size=max(rb.num_rows, 1))
                self.rows += rb.num_rows
            except BaseException as e:  # surfaced in put()/close()
                self._error = e

    def put(self, batch: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(batch)

    def close(self, doc_start: int, doc_end: int, key: str) -> ShardRecord:
        self._q.put(None)
        self._thread.join()
        self._writer.close()
        if self._error is not None:
            self.abort()
            raise self._error
        import os

        size, digest = os.path.getsize(self._tmp), file_sha256(self._tmp)
        self._ctx.__exit__(None, None, None)  # atomic rename / upload
        rec = ShardRecord(
            self.index,
            self.paths.shard(self.index).rsplit("/", 1)[-1],
            doc_start,
            doc_end,
            self.rows,
            size,
            digest,
            key,
        )
        self.store.write_json(sidecar_url(self.paths, self.index), rec._asdict())
        return rec

    def abort(self) -> None:
        """Stop the writer thread first (closing the Parquet writer while the thread writes a batch to it crashed
        the process with SIGSEGV: a Ctrl-C mid-extraction, once in a CI run), then drop the partial file."""
        self._aborting = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        try:
            self._writer.close()
        except Exception:
            pass
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def sidecar_url(paths: RunPaths, index: int) -> str:
    return paths.shard(index)[: -len(".parquet")] + ".json"


def read_sidecar(store: Store, paths: RunPaths, index: int) -> ShardRecord | None:
    try:
        return ShardRecord(**store.read_json(sidecar_url(paths, index)))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def shard_valid(
    store: Store, paths: RunPaths, rec: ShardRecord | None, key: str, verify: str = "checksum"
) -> bool:
    """Does the shard file exist and match its record (size, and sha256 when verify='checksum')?"""
    if rec is None or rec.key != key:
        return False
    url = paths.shard(rec.index)
    try:
        if store.size(url) != rec.bytes:
            return False
    except FileNotFoundError:
        return False
    if verify == "checksum":
        h = hashlib.sha256()
        with store.open_read(url) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest() == rec.sha256
    return True


def manifest_fingerprint(records: Sequence[ShardRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.index}:{r.sha256}:{r.rows}:{r.key};".encode())
    return h.hexdigest()[:32]


def write_docs_table(store: Store, paths: RunPaths, docs: Sequence[Any]) -> None:
    cols = {
        "doc_id": [d.doc_id for d in docs],
        "id": [d.id for d in docs],
        "text": [d.text for d in docs],
        "behaviour": [d.behaviour for d in docs],
        "n_tokens": [len(d.token_ids) for d in docs],
    }
    store.write_parquet(paths.table("activation_docs"), pa.table(cols, schema=schemas.DOCS))


def write_tokens_table(store: Store, paths: RunPaths, records: Sequence[ShardRecord]) -> int:
    """Project the shards onto TOKEN_COLUMNS into one tokens.parquet (one row group per shard, streaming)."""
    url = paths.table("activation_tokens")
    rows = 0
    with store.writing(url, "application/vnd.apache.parquet") as tmp:
        writer: pq.ParquetWriter | None = None
        for rec in records:
            with store.open_read(paths.shard(rec.index)) as f:
                t = pq.read_table(f, columns=TOKEN_COLUMNS)
            writer = writer or pq.ParquetWriter(tmp, schemas.TOKENS, compression="zstd")
            writer.write_table(t)
            rows += t.num_rows
        if writer is not None:
            writer.close()
    return rows


def commit_manifest(
    store: Store, paths: RunPaths, records: Sequence[ShardRecord], meta: dict[str, Any]
) -> str:
    """Delete stray shards of earlier settings, then write the manifest (last). Returns its fingerprint."""
    keep = {r.file for r in records} | {r.file[: -len(".parquet")] + ".json" for r in records}
    for url in store.ls(paths.stage("activations")):
        name = url.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name not in keep:
            store.delete(url)
    fp = manifest_fingerprint(records)
    manifest = {"fingerprint": fp, "shards": [r._asdict() for r in records], **meta}
    manifest["rows"] = sum(r.rows for r in records)
    store.write_json(paths.activations_manifest, manifest)
    return fp


def read_manifest(store: Store, paths: RunPaths) -> dict[str, Any] | None:
    try:
        return store.read_json(paths.activations_manifest)
    except FileNotFoundError:
        return None


def _diff_row_groups(
    store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: Any, order_seed: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(doc_id [n], float32 diff [n, D]) of the in_sae rows of documents in `doc_ids`, one row group at a time; with
    `order_seed` the shards are visited in a seeded random order."""
    shards = list(manifest["shards"])
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(shards)
    allowed = pa.array(np.asarray(doc_ids, dtype=np.int64))
    for rec in shards:
        with store.open_read(paths.shard(rec["index"])) as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["doc_id", "in_sae", "diff"])
                keep = pc.and_(t["in_sae"], pc.is_in(t["doc_id"], value_set=allowed))
                t = t.filter(keep)
                if t.num_rows == 0:
                    continue
                yield t["doc_id"].to_numpy(), _rows(t["diff"]).astype(np.float32, copy=False)


def iter_diff_chunks(
    store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: Any, order_seed: int | None = None
) -> Iterator[np.ndarray]:
    """Yield float32 [n, D] diff rows (in_sae only, doc_id in `doc_ids`), one row group at a time.

    `doc_ids` is a numpy array of allowed doc ids (the train or validation split). With `order_seed` the shards are
    visited in a seeded random order, so a shuffle buffer downstream mixes shards.
    """
    for _, rows in _diff_row_groups(store, paths, manifest, doc_ids, order_seed):
        yield rows


def read_diffs_by_doc(
    store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: Any, max_rows: int, seed: int = 0
) -> dict[int, np.ndarray]:
    """float32 [n, D] diff rows (in_sae only) of each document in `doc_ids`, one pass over the shards' row groups;
    documents are kept whole, in a seeded random order, while the total stays within `max_rows` (at least one)."""
    parts: dict[int, list[np.ndarray]] = {}
    for ids, rows in _diff_row_groups(store, paths, manifest, doc_ids, None):
        for d in np.unique(ids):
            parts.setdefault(int(d), []).append(rows[ids == d])
    out: dict[int, np.ndarray] = {}
    total = 0
    for d in np.random.default_rng(seed).permutation(sorted(parts)).tolist():
        x = np.concatenate(parts[d])
        if out and total + len(x) > max_rows:
            continue
        out[d], total = x, total + len(x)
    return dict(sorted(out.items()))


def read_docs(store: Store, paths: RunPaths, doc_ids: Sequence[int] | None = None) -> list[Doc]:
    """The run's documents as extraction saw them (token ids and roles), read back from the activations stage's
    docs and tokens tables: downstream stages never reopen the prompts file nor tokenize again."""
    docs = store.read_parquet(paths.table("activation_docs")).to_pylist()
    toks = store.read_parquet(paths.table("activation_tokens"), columns=["doc_id", "pos", "token_id", "role"])
    order = np.lexsort((toks["pos"].to_numpy(), toks["doc_id"].to_numpy()))
    doc_col = toks["doc_id"].to_numpy()[order]
    ids, roles = toks["token_id"].to_numpy()[order], np.asarray(toks["role"].to_pylist(), dtype=object)[order]
    starts = np.searchsorted(doc_col, [d["doc_id"] for d in docs], side="left")
    ends = np.searchsorted(doc_col, [d["doc_id"] for d in docs], side="right")
    wanted = None if doc_ids is None else set(int(i) for i in doc_ids)
    out = []
    for d, a, b in zip(docs, starts, ends):
        if wanted is not None and d["doc_id"] not in wanted:
            continue
        if b - a != d["n_tokens"]:
            raise RuntimeError(f"activations: document {d['doc_id']} has {b - a} tokens, expected {d['n_tokens']}")
        out.append(Doc(d["doc_id"], d["id"], d["text"], d["behaviour"], ids[a:b].tolist(), list(roles[a:b])))
    return out


def read_doc_kls(store: Store, paths: RunPaths) -> dict[int, np.ndarray]:
    """Per document, extraction's KL(p_ft ‖ p_base) per position (float32 [n_tokens]): what the attribution stage
    reuses instead of running the base model's upper blocks again."""
    toks = store.read_parquet(paths.table("activation_tokens"), columns=["doc_id", "pos", "kl"])
    doc_N, pos_N = toks["doc_id"].to_numpy(), toks["pos"].to_numpy()
    order = np.lexsort((pos_N, doc_N))
    doc_N, kl_N = doc_N[order], toks["kl"].to_numpy().astype(np.float32)[order]
    ids, starts = np.unique(doc_N, return_index=True)
    return {int(d): part for d, part in zip(ids, np.split(kl_N, starts[1:]))}


def has_states(store: Store, paths: RunPaths, manifest: dict[str, Any]) -> bool:
    """Whether the shards carry the unpatched runs' states (extract.save_states): their schema says so."""
    if not manifest["shards"]:
        return False
    with store.open_read(paths.shard(manifest["shards"][0]["index"])) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return all(n in names for n in schemas.STATE_COLUMNS)


def read_doc_states(store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: Sequence[int]) -> dict[int, Any]:
    """Per document in `doc_ids`, its stored states (extract.save_states) as float32 [n_tokens, 3, D] in position
    order (h_base, h_ft, x_ft: diffsae.extract.States). Only the shards whose document range holds one of them are
    opened, and of those only the row groups (forward batches) that do: the doc_id column is read first."""
    wanted = np.unique(np.asarray(doc_ids, dtype=np.int64))
    allowed = pa.array(wanted)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for rec in manifest["shards"]:
        lo, hi = np.searchsorted(wanted, [rec["doc_start"], rec["doc_end"]])
        if lo == hi:
            continue
        with store.open_read(paths.shard(rec["index"])) as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                ids = pf.read_row_group(rg, columns=["doc_id"])["doc_id"]
                if not pc.any(pc.is_in(ids, value_set=allowed)).as_py():
                    continue
                t = pf.read_row_group(rg, columns=["doc_id", "pos", *schemas.STATE_COLUMNS])
                t = t.filter(pc.is_in(t["doc_id"], value_set=allowed))
                states_N3D = np.stack([_rows(t[n]) for n in schemas.STATE_COLUMNS], axis=1)  # [n, 3, D]
                doc_N, pos_N = t["doc_id"].to_numpy(), t["pos"].to_numpy()
                for doc in np.unique(doc_N):
                    sel = doc_N == doc
                    parts.setdefault(int(doc), []).append((pos_N[sel], states_N3D[sel]))
    out = {}
    for doc, chunks in parts.items():
        pos_N = np.concatenate([p for p, _ in chunks])
        out[doc] = np.concatenate([s for _, s in chunks])[np.argsort(pos_N, kind="stable")]
    missing = set(wanted.tolist()) - set(out)
    if missing:
        raise RuntimeError(f"activations: no stored states for documents {sorted(missing)[:5]}")
    return out
