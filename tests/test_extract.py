"""Stage 1 end to end on a tiny real pair: rows, values, caching, deleted/corrupted shards, a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from diffsae.config import PipelineConfig
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _run(cfg_dict: dict) -> dict:
    """The extract flow's states and its result's fields, as one dict."""
    from flows.stages import extract_flow

    activations, states = extract_flow(config=PipelineConfig.from_dict(cfg_dict))
    return {**activations._asdict(), "stages": states}


def _dataset_tokens(root: Path, max_tokens: int = 64) -> int:
    from transformers import AutoTokenizer

    from diffsae.data import load_docs

    tok = AutoTokenizer.from_pretrained(root / "finetuned")
    return sum(len(d.token_ids) for d in load_docs(root / "prompts.jsonl", tok, max_tokens))


def _local_rows(store: str, run: str) -> tuple[int, int]:
    glob = RunPaths(store, run).url("activations", "shard-*.parquet")
    n, uniq = duckdb.sql(
        f"select count(*), count(distinct (doc_id, pos)) from read_parquet('{glob}')"
    ).fetchone()
    return int(n), int(uniq)


def test_extract_values_and_caching(tiny_pair: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    cfg = tiny_config(tiny_pair, store)
    out = _run(cfg)
    assert out["stages"]["extract"] == {"Completed": 5}
    n, uniq = _local_rows(store, "t")
    assert n == uniq == _dataset_tokens(tiny_pair) == out["rows"]

    # values: recompute one document directly and compare diff and KL
    from transformers import AutoModelForCausalLM

    from diffsae.hooks import read_residual
    from diffsae.kl import kl_per_token

    paths = RunPaths(store, "t")
    rows = duckdb.sql(
        f"select pos, token_id, kl, diff, in_sae from read_parquet('{paths.url('activations')}"
        "/shard-*.parquet') where doc_id = 3 order by pos"
    ).fetchall()
    ids = torch.tensor([[r[1] for r in rows]])
    hs, logits = [], []
    for name in ("base", "finetuned"):
        m = AutoModelForCausalLM.from_pretrained(tiny_pair / name).eval()
        with torch.no_grad(), read_residual(m, 1) as cap:
            logits.append(m(ids).logits)
        hs.append(cap.value[0])
    diff = np.array([r[3] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(diff, (hs[1] - hs[0]).numpy(), atol=1e-4)
    np.testing.assert_allclose([r[2] for r in rows], kl_per_token(logits[1], logits[0])[0].numpy(), atol=1e-5)
    assert [r[4] for r in rows] == [False] + [True] * (len(rows) - 1)  # skip_first=1: BOS not SAE data

    docs = duckdb.sql(
        f"select count(*) from read_parquet('{paths.url('activations', 'docs.parquet')}')"
    ).fetchone()
    assert docs[0] == 40
    tok = duckdb.sql(
        f"select count(*), count(token) from read_parquet('{paths.url('activations', 'tokens.parquet')}')"
    )
    assert tok.fetchone() == (n, n)

    # rerun: everything cached
    out2 = _run(cfg)
    assert out2["stages"]["extract"] == {"Cached": 5} and out2["stages"]["commit_activations"] == {"Cached": 1}

    # deleted shard -> that shard only recomputed; truncated shard -> detected and recomputed
    store_ = Store(store)
    store_.delete(paths.shard(2))
    with open(paths.shard(4), "r+b") as f:
        f.truncate(100)
    out3 = _run(cfg)
    assert out3["stages"]["extract"] == {"Cached": 3, "Completed": 2}
    manifest = act.read_manifest(store_, paths)  # recomputed shards are bit-identical: manifest still true
    assert all(act.file_sha256(paths.shard(r["index"])) == r["sha256"] for r in manifest["shards"])
    assert _local_rows(store, "t") == (n, n)

    # a flipped byte (same size) fails the checksum and is recomputed too
    data = bytearray(Path(paths.shard(1)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(paths.shard(1)).write_bytes(bytes(data))
    out4 = _run(cfg)
    assert out4["stages"]["extract"] == {"Cached": 4, "Completed": 1}


def test_extract_on_s3(tiny_pair: Path, s3_store: str) -> None:
    out = _run(tiny_config(tiny_pair, s3_store, extract={"dtype": "float16"}))
    assert out["stages"]["extract"] == {"Completed": 5}
    store, paths = Store(s3_store), RunPaths(s3_store, "t")
    manifest = act.read_manifest(store, paths)
    assert manifest is not None and manifest["rows"] == _dataset_tokens(tiny_pair)
    t = store.read_parquet(paths.shard(0))
    diff_type = t.schema.field("diff").type
    assert diff_type.list_size == 32 and str(diff_type.value_type) == "halffloat"
    assert _run(tiny_config(tiny_pair, s3_store, extract={"dtype": "float16"}))["stages"]["extract"] == {
        "Cached": 5
    }


KILL_SCRIPT = """
import sys, json
sys.path.insert(0, {root!r})
from tests.test_extract import _run
_run(json.loads({cfg!r}))
"""


@pytest.mark.slow
def test_killed_run_resumes(tiny_pair: Path, tmp_path: Path) -> None:
    import json

    store = str(tmp_path / "store")
    cfg = tiny_config(tiny_pair, store, extract={"shard_tokens": 150})
    paths = RunPaths(store, "t")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), cfg=json.dumps(cfg))],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not os.path.exists(act.sidecar_url(paths, 2)):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    done = sorted(p.name for p in Path(paths.stage("activations")).glob("shard-*.json"))
    assert 3 <= len(done) < 14, done  # killed after some shards and before the last
    assert not os.path.exists(paths.activations_manifest)
    out = _run(cfg)
    n_shards = sum(out["stages"]["extract"].values())
    # Every finished shard is reused, except possibly the last one: the kill can land after its sidecar was written
    # and before Prefect persisted the task's result record; that shard is then recomputed (same rows, same file).
    assert out["stages"]["extract"]["Cached"] >= len(done) - 1
    assert out["stages"]["extract"].get("Completed", 0) == n_shards - out["stages"]["extract"]["Cached"]
    n, uniq = _local_rows(store, "t")
    assert n == uniq == _dataset_tokens(tiny_pair)
