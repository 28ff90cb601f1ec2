"""`make serve` / `make stop` (flows/serve.py) with real processes, no mocks.

Fast: the pid-file stop logic (SIGTERM, SIGKILL after the timeout, a PID that no longer names our process is left
alone), refusal on a busy port, on running services and on a bad port variable. Slow: the whole set of services on
free ports in temp folders; the pipeline deployment is launched with the command the README documents, runs on the
worker and completes with its dashboards on the store and its training in the MLflow UI's db; every listening socket
of the services is on 127.0.0.1; after `stop` no started process is alive.

    .venv/bin/python -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services import serve
from services.s3server import find_free_base, ports_for
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _free_ports() -> dict[str, int]:
    s3 = find_free_base()
    taken = set(ports_for(s3).values())
    out: dict[str, int] = {"s3": s3}
    for name in ("prefect", "mlflow"):
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in taken:
                taken.add(port)
                out[name] = port
                break
    return out


def _children(pid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if kids:
            return [int(k) for k in kids]
        time.sleep(0.05)
    raise AssertionError(f"process {pid} started no child")


def test_stop_terminates_exactly_the_recorded_processes(tmp_path: Path) -> None:
    polite = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        grandchild = _children(stubborn.pid)[0]  # ignores SIGTERM too (inherited)
        serve.record(tmp_path, "worker", polite)
        serve.record(tmp_path, "stubborn", stubborn)
        # a recorded PID whose process is not the one we started (PID reuse): must be left alone
        state = serve.read_pids(tmp_path)
        assert state is not None
        entry = serve.record(tmp_path, "reused", bystander)
        state["processes"].append({**entry, "start_time": entry["start_time"] - 1})
        serve.pid_file(tmp_path).write_text(json.dumps(state))

        t0 = time.monotonic()
        stopped = serve.stop(tmp_path, timeout=2.0, echo=lambda _: None)
        elapsed = time.monotonic() - t0
        assert [e["name"] for e in stopped] == ["worker", "stubborn", "reused"]
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert elapsed >= 2.0  # SIGKILL only after the timeout
        assert not serve.alive(grandchild), "the process group was not stopped"
        assert bystander.poll() is None, "a process that was not started by us was signalled"
        assert not serve.pid_file(tmp_path).exists()
    finally:
        for p in (polite, stubborn, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_start_refuses_busy_port_and_running_services(tmp_path: Path) -> None:
    ports = _free_ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports["mlflow"]))
        s.listen()
        with pytest.raises(serve.ServeError, match=rf"ports in use on 127\.0\.0\.1: mlflow={ports['mlflow']}$"):
            serve.start(tmp_path, ports, store=str(tmp_path / "store"), echo=lambda _: None)
    assert not serve.pid_file(tmp_path).exists()
    assert not (tmp_path / ".serve" / "logs").exists()  # nothing was started

    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        serve.record(tmp_path, "prefect-server", sleeper)
        with pytest.raises(serve.ServeError, match="already running"):
            serve.start(tmp_path, _free_ports(), store=str(tmp_path / "store"), echo=lambda _: None)
        assert sleeper.poll() is None and serve.pid_file(tmp_path).exists()
    finally:
        serve.stop(tmp_path, timeout=5, echo=lambda _: None)
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_cli_reports_one_line_and_fails() -> None:
    env = {**os.environ, "DIFFSAE_S3_PORT": "lots"}
    out = subprocess.run([sys.executable, "-m", "services.serve", "start"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "diffsae serve: error: not a port number: DIFFSAE_S3_PORT='lots'", out.stderr


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of `pids` (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = f[1].split(":")
            raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, len(hex_addr), 8))
            found.add((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def _deployment_run(info: dict, name: str, cfg: dict) -> dict:
    """`prefect deployment run NAME --param config=<JSON> --watch` (as in the README); returns the flow run."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", name, "--param",
         f"config={json.dumps(cfg)}", "--watch", "--watch-timeout", "600"],
        cwd=ROOT, env={**os.environ, **info["env"]}, capture_output=True, text=True, timeout=660)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout)
    assert flow_run_id, run.stdout[-2000:]
    with urllib.request.urlopen(f"{info['prefect_api']}/flow_runs/{flow_run_id.group(1)}") as r:
        flow_run = json.load(r)
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    return flow_run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_runs_the_pipeline_deployment(tiny_pair: Path, tmp_path: Path) -> None:
    ports, root, store = _free_ports(), tmp_path / "repo", str(tmp_path / "store")
    t0 = time.monotonic()
    started: dict[int, int] = {}  # pid -> start time of every process of the services (and their children)
    try:
        info = serve.start(root, ports, store=store, prefect_home=str(tmp_path / "prefect"))
        t_start = time.monotonic() - t0
        entries = (serve.read_pids(root) or {})["processes"]
        assert [e["name"] for e in entries] == ["prefect-server", "mlflow-ui", "s3", "worker"]
        assert info["deployments"] == ["analyse/analyse", "dashboards/dashboards", "diffsae-pipeline/pipeline",
                                       "extract/extract", "train/train"]
        for e in entries:
            started |= {p: st[3] for p in serve._members(e) if (st := serve._stat(p))}
        sockets = _listening(set(started))
        assert {ports["prefect"], ports["mlflow"], ports["s3"]} <= {port for _, port in sockets}, sockets
        assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets

        # the command of the README, with a JSON object for the typed `config` parameter
        cfg = tiny_config(tiny_pair, store, run="served", sae={"n_latents": 64, "k": 4, "batch_size": 64,
                                                             "epochs": 1}, attribution={"steps": 2})
        t1 = time.monotonic()
        flow_run = _deployment_run(info, "diffsae-pipeline/pipeline", cfg)
        t_run = time.monotonic() - t1
        assert flow_run["parameters"]["config"]["run"] == "served"
        assert (Path(store) / "runs" / "served" / "dashboards" / "index.html").is_file()
        # a stage deployment (flows/stages.py entry point) on the same config, through the worker too
        _deployment_run(info, "dashboards/dashboards", cfg)
        # the training was logged where the MLflow UI looks
        url = f"{info['mlflow_ui']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=diffsae-served"
        with urllib.request.urlopen(url) as r:
            assert json.load(r)["experiment"]["name"] == "diffsae-served"
        print(f"\nstart {t_start:.0f}s, deployment run {t_run:.0f}s")
    finally:
        entries = (serve.read_pids(root) or {"processes": []})["processes"]
        for e in entries:
            started |= {p: st[3] for p in serve._members(e) if (st := serve._stat(p))}
        serve.stop(root)
    assert started
    assert not [p for p, t in started.items() if serve.alive(p, t)], "a started process survived `stop`"
    assert not serve.pid_file(root).exists()
