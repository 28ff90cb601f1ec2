"""The S3 server stops in the middle of a run: tasks retry with backoff and the run completes when it comes back;
if it never comes back, the run fails with a clear error and no partial object is visible."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from services.s3server import S3Server
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _cli(cfg: dict, tmp: Path, endpoint: str) -> subprocess.Popen:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "DIFFSAE_IO_RETRY_DELAYS": "2,3,4,6",
           "PREFECT_HOME": str(tmp / "prefect")}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def own_server(s3_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A second SeaweedFS server of this test alone (it gets stopped and restarted)."""
    srv = S3Server(str(tmp_path / "weed"))
    srv.start()
    fs = s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret,
                           client_kwargs={"endpoint_url": srv.endpoint_url}, skip_instance_cache=True)
    fs.mkdir("outage")
    yield srv
    srv.stop()


def _shards_seen(store: Store, paths: RunPaths) -> int:
    try:
        return len([u for u in store.ls(paths.stage("activations")) if u.endswith(".json")])
    except Exception:
        return 0


@pytest.mark.slow
def test_outage_then_recovery(tiny_pair: Path, tmp_path: Path, own_server: S3Server,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", own_server.endpoint_url)
    store_url = "s3://outage/store"
    cfg = tiny_config(tiny_pair, store_url, extract={"shard_tokens": 150}, sae={"n_latents": 64, "k": 4,
                      "batch_size": 64, "epochs": 1}, attribution={"steps": 2})
    store, paths = Store(store_url), RunPaths(store_url, "t")
    proc = _cli(cfg, tmp_path, own_server.endpoint_url)
    assert _wait_for(lambda: _shards_seen(store, paths) >= 2, 300), "extraction never started"
    own_server.stop()  # the store goes away mid-run...
    time.sleep(4)
    threading.Thread(target=own_server.start, daemon=True).start()  # ...and comes back
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "dashboards:" in out
    manifest = act.read_manifest(Store(store_url), paths)
    assert manifest is not None and manifest["rows"] > 0


@pytest.mark.slow
def test_outage_without_recovery_fails_clearly(tiny_pair: Path, tmp_path: Path, own_server: S3Server,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", own_server.endpoint_url)
    store_url = "s3://outage/store"
    cfg = tiny_config(tiny_pair, store_url, extract={"shard_tokens": 150})
    store, paths = Store(store_url), RunPaths(store_url, "t")
    proc = _cli(cfg, tmp_path, own_server.endpoint_url)
    assert _wait_for(lambda: _shards_seen(store, paths) >= 2, 300), "extraction never started"
    own_server.stop()  # and it never comes back
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("diffsae: error:")]
    assert len(errors) == 1 and "did not answer after retries" in errors[0], err[-3000:]
    own_server.start()  # look at what was left: only whole shards with their records, no manifest
    store = Store(store_url)
    names = [u.rsplit("/", 1)[-1] for u in store.ls(paths.stage("activations"))]
    assert "manifest.json" not in names
    for name in names:
        assert name.startswith("shard-") and name.endswith((".parquet", ".json")), name
    for name in [n for n in names if n.endswith(".parquet")]:
        rec = act.read_sidecar(store, paths, int(name[6:11]))
        assert rec is not None and act.shard_valid(store, paths, rec, rec.key), name
