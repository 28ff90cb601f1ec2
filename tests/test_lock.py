"""The run lock: one holder at a time (local and real S3), clear one-line refusal, stale locks taken over,
and two CLI runs at once: different names both complete, the same name never interleaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.runners import ONE_THREAD
from storage.lock import RunLock, RunLocked
from storage.paths import RunPaths
from storage.store import Store
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_one_holder_then_release(any_store: str) -> None:
    store, paths = Store(any_store), RunPaths(any_store, "r")
    a = RunLock(store, paths)
    a.acquire()
    with pytest.raises(
        RunLocked, match=r"^run 'r' is locked by .* pid \d+ since .*pick another run name\)?$"
    ) as e:
        RunLock(store, paths).acquire()
    assert "\n" not in str(e.value)
    RunLock(store, RunPaths(any_store, "other")).acquire()  # other run names are independent
    a.release()
    assert not store.exists(paths.lock)
    with RunLock(store, paths):
        assert store.exists(paths.lock)


def test_waits_for_holder(tmp_path: Path) -> None:
    store, paths = Store(str(tmp_path)), RunPaths(str(tmp_path), "r")
    a = RunLock(store, paths)
    a.acquire()
    import threading

    threading.Timer(1.0, a.release).start()
    t0 = time.monotonic()
    with RunLock(store, paths, wait=10):
        assert time.monotonic() - t0 >= 0.9


def test_stale_lock_is_taken_over(any_store: str) -> None:
    store, paths = Store(any_store), RunPaths(any_store, "r")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_bytes(
        paths.lock,
        json.dumps(
            {
                "owner": "x",
                "host": socket.gethostname(),
                "pid": dead.pid,
                "since": time.time(),
                "beat": time.time(),
            }
        ).encode(),
    )
    with RunLock(store, paths):  # the holder's process is gone: stale
        pass
    store.write_bytes(
        paths.lock,
        json.dumps(
            {"owner": "y", "host": "elsewhere", "pid": 1, "since": 0, "beat": time.time() - 3600}
        ).encode(),
    )
    with RunLock(store, paths, ttl=600):  # heartbeat an hour old: stale
        pass


def _cli(cfg: dict, tmp: Path, name: str) -> subprocess.Popen:
    """A `diffsae run` on one torch thread: two at once on a 2-core machine, each with a thread per core, ran
    5-10x slower than one (thread oversubscription) and once took over 10 minutes in CI."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **ONE_THREAD, "PREFECT_HOME": str(tmp / f"prefect-{name}")}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_all(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[str, str]]:
    """Every process's (stdout, stderr); past `timeout` all are killed and the failure shows their stderr tails."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [(p.communicate()[1] or "")[-3000:] for p in procs]
        pytest.fail(f"runs still going after {timeout:.0f} s; stderr tails: {tails}")
    return outs


@pytest.mark.slow
def test_concurrent_runs(tiny_pair: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    sae = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 1}
    small = {"sae": sae, "validation": {"top": 2, "n_prompts": 2, "max_new_tokens": 8}}
    # same name twice: one completes, the other fails clearly (exit 2, one line), never interleaving
    procs = [_cli(tiny_config(tiny_pair, store, run="same", **small), tmp_path, f"s{i}") for i in range(2)]
    outs = _wait_all(procs)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    errors = [line for line in loser.splitlines() if line.startswith("diffsae: error:")]
    assert len(errors) == 1 and errors[0].startswith("diffsae: error: run 'same' is locked by "), loser
    assert not Store(store).exists(RunPaths(store, "same").lock)
    # different names at once: both complete
    procs = [_cli(tiny_config(tiny_pair, store, run=f"n{i}", **small), tmp_path, f"n{i}") for i in range(2)]
    outs = _wait_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    for i in range(2):
        assert Store(store).exists(f"{RunPaths(store, f'n{i}').dashboards_dir}/index.html")
