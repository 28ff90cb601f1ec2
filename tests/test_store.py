"""The store round-trips on both backends, writes are atomic, and bad stores fail in one line."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from storage.paths import RunPaths
from storage.store import Store, StoreError


def test_roundtrip_bytes_json_parquet(any_store: str) -> None:
    paths = RunPaths(any_store, "r1")
    store = Store(paths.store_root)
    store.check()
    url = paths.url("x", "blob.bin")
    store.write_bytes(url, b"\x00\x01hello")
    assert store.exists(url)
    assert store.read_bytes(url) == b"\x00\x01hello"
    store.write_json(paths.url("x", "m.json"), {"a": [1, 2]})
    assert store.read_json(paths.url("x", "m.json")) == {"a": [1, 2]}
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64()), "b": ["x", "y", "z"]})
    size = store.write_parquet(paths.url("x", "t.parquet"), table)
    assert size == store.size(paths.url("x", "t.parquet"))
    assert store.read_parquet(paths.url("x", "t.parquet")).equals(table)
    assert store.ls(paths.url("x")) == sorted(paths.url("x", n) for n in ("blob.bin", "m.json", "t.parquet"))
    store.delete_tree(paths.url("x"))
    assert not store.exists(url)
    assert store.ls(paths.url("x")) == []


def test_interrupted_write_leaves_no_object(any_store: str) -> None:
    paths = RunPaths(any_store, "r1")
    store = Store(paths.store_root)
    url = paths.url("stage", "big.parquet")
    with pytest.raises(KeyboardInterrupt):
        with store.writing(url) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial" * 1000)
            raise KeyboardInterrupt  # killed mid-write
    assert not store.exists(url)
    assert store.ls(paths.url("stage")) == []
    if not store.is_s3:
        assert os.listdir(paths.url("stage")) == []  # no temp file left behind


def test_missing_bucket_is_one_line(s3_server) -> None:
    with pytest.raises(StoreError, match=r"^S3 bucket 'no-such-bucket-x' does not exist at http://127") as e:
        Store("s3://no-such-bucket-x/p").check()
    assert "\n" not in str(e.value)


def test_refused_credentials_is_one_line(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StoreError, match=r"^S3 credentials refused by http://127") as e:
        Store(f"s3://{bucket}/p").check()
    assert "\n" not in str(e.value)


def test_unreachable_endpoint_is_one_line(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.s3server import find_free_base

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{find_free_base()}")
    with pytest.raises(StoreError, match=r"^cannot reach S3 endpoint http://127") as e:
        Store("s3://bucket-x/p").check()
    assert "\n" not in str(e.value)


def test_unwritable_local_store_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="is not writable"):
        Store(str(blocker / "sub")).check()


def test_paths_differ_only_by_root() -> None:
    a, b = RunPaths("/data/x", "demo"), RunPaths("s3://bkt/x/", "demo")
    assert a.shard(3) == "/data/x/runs/demo/activations/shard-00003.parquet"
    assert b.shard(3) == "s3://bkt/x/runs/demo/activations/shard-00003.parquet"
    assert a.table("latents").removeprefix("/data/x") == b.table("latents").removeprefix("s3://bkt/x")
