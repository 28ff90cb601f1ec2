"""Local services for running diffsae from the Prefect UI: `make serve` and `make stop`.

What: `start` launches a Prefect server, the MLflow UI (on the flows' default tracking db), a SeaweedFS S3 store and
a Prefect worker, each detached (own session) and recorded by PID in `.serve/pids.json`; on the way it creates the
`diffsae` process work pool and the `diffsae` bucket and deploys every deployment of prefect.yaml. `stop` ends
exactly the recorded processes (worker first; SIGTERM, then SIGKILL after a timeout).
Why: launch pipeline runs from a browser (the `config` parameter is a form) and watch them. How:

    make serve      # .venv/bin/python -m services.serve start   (prints the URLs and how to launch a run)
    make stop       # .venv/bin/python -m services.serve stop    (`... status` lists what is running)

Ports, all on 127.0.0.1: DIFFSAE_PREFECT_PORT (4200), DIFFSAE_MLFLOW_PORT (5000), DIFFSAE_S3_PORT (8333; SeaweedFS
also takes the next 11 ports and S3 + 10011). State in `.serve/`: pids.json, logs/, s3/ (bucket data), prefect/
(PREFECT_HOME unless one is set), env (S3 credentials, PREFECT_API_URL, MLFLOW_TRACKING_URI: `source .serve/env`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]  # the project: prefect.yaml, and the deployments' working directory
POOL = "diffsae"
BUCKET = "diffsae"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 8333}
PORT_ENV = {"prefect": "DIFFSAE_PREFECT_PORT", "mlflow": "DIFFSAE_MLFLOW_PORT", "s3": "DIFFSAE_S3_PORT"}
DEFAULT_KEYS = ("diffsae", "diffsae-local-secret")
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


class ServeError(RuntimeError):
    """A one-line reason why the services could not be started."""


def state_dir(root: Path) -> Path:
    return Path(root) / ".serve"


def pid_file(root: Path) -> Path:
    return state_dir(root) / "pids.json"


def ports_from_env(env: dict[str, str] | None = None) -> dict[str, int]:
    env = dict(os.environ) if env is None else env
    raw = {n: env.get(PORT_ENV[n]) or str(d) for n, d in DEFAULT_PORTS.items()}
    bad = [f"{PORT_ENV[n]}={v!r}" for n, v in raw.items() if not v.isdigit() or not 0 < int(v) < 65536]
    if bad:
        raise ServeError(f"not a port number: {', '.join(bad)}")
    return {n: int(v) for n, v in raw.items()}


# ---- processes, by PID (Linux /proc; no psutil) ----


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    f = raw[raw.rindex(")") + 2 :].split()
    return f[0], int(f[1]), int(f[2]), int(f[19])


def alive(pid: int, start_time: int | None = None) -> bool:
    """Running (not a zombie) and, when `start_time` is given, still the same process (no PID reuse)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start_time is None or st[3] == start_time)


def _all_stats() -> dict[int, tuple[str, int, int, int]]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := _stat(int(p.name))) is not None:
            out[int(p.name)] = st
    return out


def _members(entry: dict[str, Any]) -> set[int]:
    """The recorded process, its descendants and the rest of its process group, if it is still ours."""
    stats = _all_stats()
    pid, t0 = entry["pid"], entry["start_time"]
    found = {pid} if pid in stats and stats[pid][3] == t0 else set()
    while new := {p for p, st in stats.items() if st[1] in found and p not in found}:  # descendants
        found |= new
    # left-overs of its group (started as its own session: pgid == pid). Linux never reuses a PID while a group of
    # that id exists, so a group is ours if its leader is ours or gone (not a new process under the same PID).
    pgid = entry.get("pgid", pid)
    if pgid not in stats or (pgid == pid and pid in found):
        found |= {p for p, st in stats.items() if st[2] == pgid and st[3] >= t0}
    return {p for p in found if p in stats and stats[p][0] not in ("Z", "X")}


def _signal(pids: set[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _terminate(entries: list[dict[str, Any]], timeout: float) -> dict[int, str]:
    """SIGTERM every process of the entries; SIGKILL what is left after `timeout`. Returns the killed ones."""
    targets = {p: e["name"] for e in entries for p in _members(e)}
    starts = {p: st[3] for p, st in _all_stats().items() if p in targets}
    _signal(set(targets), signal.SIGTERM)

    def wait(pids: dict[int, str], seconds: float) -> dict[int, str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(alive(p, starts.get(p)) for p in pids):
            time.sleep(0.1)
        return {p: n for p, n in pids.items() if alive(p, starts.get(p))}

    killed = wait(targets, timeout)
    _signal(set(killed), signal.SIGKILL)
    wait(killed, 10.0)
    return killed


def read_pids(root: Path) -> dict[str, Any] | None:
    return json.loads(pid_file(root).read_text()) if pid_file(root).exists() else None


def record(root: Path, name: str, proc: subprocess.Popen[Any], cmd: list[str] | None = None) -> dict[str, Any]:
    """Add a started process to `.serve/pids.json` (written at once, so `stop` can clean up a failed start)."""
    state, st = read_pids(root) or {"processes": []}, _stat(proc.pid) or ("", 0, proc.pid, 0)
    entry = {"name": name, "pid": proc.pid, "pgid": st[2], "start_time": st[3], "cmd": cmd or []}
    state["processes"].append(entry)
    pid_file(root).parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_file(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(pid_file(root))
    return entry


def stop(root: Path, timeout: float = 20.0, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Stop the processes recorded in `.serve/pids.json` (worker first, then the rest) and remove the file."""
    state = read_pids(root)
    if state is None:
        echo(f"nothing to stop: no {pid_file(root)}")
        return []
    entries = state.get("processes", [])
    workers = [e for e in entries if e["name"] == "worker"]
    rest = [e for e in reversed(entries) if e["name"] != "worker"]
    for group in (workers, rest):
        if group:
            killed = _terminate(group, timeout)
            echo("stopped " + ", ".join(f"{e['name']} (pid {e['pid']})" for e in group)
                 + (f"; killed after {timeout:.0f}s: {sorted(killed.items())}" if killed else ""))
    pid_file(root).unlink(missing_ok=True)
    return entries


def running(root: Path) -> list[dict[str, Any]]:
    return [e for e in (read_pids(root) or {"processes": []})["processes"] if alive(e["pid"], e["start_time"])]


# ---- start ----


def _binary(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ServeError(f"`{name}` not found next to {sys.executable} or on PATH: run `make install`")
    return found


def _busy(ports: dict[str, int]) -> list[str]:
    """`name=port` for every port that is taken (or asked for twice); SeaweedFS uses a block from the S3 port."""
    from services.s3server import port_free, ports_for

    wanted = [(n, p) for n, p in ports.items() if n != "s3"]
    wanted += [("s3" if k == "s3.port" else f"s3 {k}", p) for k, p in ports_for(ports["s3"]).items()]
    seen: dict[int, str] = {}
    busy = []
    for name, p in wanted:
        if p in seen:
            busy.append(f"{name}={p} (also {seen[p]})")
        elif not port_free(p):
            busy.append(f"{name}={p}")
        seen.setdefault(p, name)
    return busy


def _tail(path: Path, n: int = 400) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " ".join(" | ".join(text[-3:]).split())[-n:]


def _http(url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _answers(url: str) -> bool:
    try:
        return _http(url) is not None
    except urllib.error.HTTPError:
        return True  # e.g. S3's 403 without credentials: the server is up


def _wait(name: str, probe: Callable[[], bool], proc: subprocess.Popen[Any] | None, log: Path,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"{name} exited with status {proc.returncode}: {_tail(log)} (log: {log})")
        try:
            if probe():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise ServeError(f"{name} did not answer within {timeout:.0f}s (log: {log})")


def _run(name: str, cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    with open(log, "ab") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise ServeError(f"{name} took more than {timeout:.0f}s (log: {log})") from None
    if rc != 0:
        raise ServeError(f"{name} failed with status {rc}: {_tail(log)} (log: {log})")


def start(root: Path, ports: dict[str, int] | None = None, store: str = "./diffsae-data",
          prefect_home: str | None = None, timeout: float = 240.0,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the services (see the module docstring); returns their URLs, the client environment and the PIDs.

    `root` holds the `.serve/` state folder (the repository root for `make serve`). A relative local `store`
    is taken from the project root, as the deployments' flow runs see it."""
    root = Path(root).resolve()
    ports = {**DEFAULT_PORTS, **(ports or {})}
    if running(root):
        raise ServeError(f"services already running (pids in {pid_file(root)}): run `make stop` first")
    from storage.mlflow_setup import tracking_uri
    from storage.paths import RunPaths, is_s3

    if not is_s3(store) and not os.path.isabs(os.path.expanduser(store.removeprefix("file://"))):
        store = str(ROOT / store.removeprefix("file://"))
    mlflow_uri = tracking_uri(RunPaths(store, "serve"))  # the flows' own default: <local store>/mlflow.db
    serve_mlflow = mlflow_uri.startswith("sqlite:")  # else MLFLOW_TRACKING_URI names a server already
    busy = _busy(ports if serve_mlflow else {k: v for k, v in ports.items() if k != "mlflow"})
    if busy:
        raise ServeError(f"ports in use on 127.0.0.1: {', '.join(busy)}")
    pid_file(root).unlink(missing_ok=True)  # a stale record: nothing in it is alive
    sdir, logs = state_dir(root), state_dir(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_KEYS[0]
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or DEFAULT_KEYS[1]
    region = os.environ.get("AWS_REGION") or "us-east-1"
    urls = {
        "prefect_ui": f"http://127.0.0.1:{ports['prefect']}",
        "prefect_api": f"http://127.0.0.1:{ports['prefect']}/api",
        "mlflow_ui": f"http://127.0.0.1:{ports['mlflow']}",
        "s3_endpoint": f"http://127.0.0.1:{ports['s3']}",
    }
    client_env = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": urls["s3_endpoint"],
        "AWS_REGION": region,
        "PREFECT_API_URL": urls["prefect_api"],
        **({"MLFLOW_TRACKING_URI": mlflow_uri} if serve_mlflow else {}),  # runs on S3 stores show up in the UI too
    }
    env_file = sdir / "env"
    env_file.write_text("# written by `make serve`: `source .serve/env` to reach the local S3 store and Prefect\n"
                        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in client_env.items()))
    env_file.chmod(0o600)
    home = prefect_home or os.environ.get("PREFECT_HOME") or str(sdir / "prefect")
    env = {**os.environ, **QUIET, **client_env, "PREFECT_HOME": home, "DIFFSAE_HOME": str(ROOT),
           "MLFLOW_S3_ENDPOINT_URL": urls["s3_endpoint"]}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # MLflow's GenAI job runners: 8 idle processes
    procs: dict[str, subprocess.Popen[Any]] = {}

    def spawn(name: str, cmd: list[str], cwd: Path) -> subprocess.Popen[Any]:
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        record(root, name, proc, cmd)
        procs[name] = proc
        return proc

    from services.s3server import weed_command

    prefect = _binary("prefect")
    try:
        echo(f"starting the Prefect server on {urls['prefect_ui']} (PREFECT_HOME={home})")
        spawn("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
              ROOT)
        if serve_mlflow:
            echo(f"starting the MLflow UI on {urls['mlflow_ui']} ({mlflow_uri})")
            spawn("mlflow-ui", [_binary("mlflow"), "ui", "--backend-store-uri", mlflow_uri, "--host", "127.0.0.1",
                                "--port", str(ports["mlflow"]), "--workers", "1"], sdir)
        else:
            urls["mlflow_ui"] = mlflow_uri
        echo(f"starting the S3 store on {urls['s3_endpoint']} (data in {sdir / 's3'})")
        (sdir / "s3").mkdir(exist_ok=True)
        spawn("s3", weed_command(str(sdir / "s3"), ports["s3"]), sdir)  # as `diffsae s3-server`; keys from env
        _wait("the S3 store", lambda: _answers(urls["s3_endpoint"] + "/"), procs["s3"], logs / "s3.log", timeout)
        _wait("the Prefect server", lambda: _http(urls["prefect_api"] + "/health") is True,
              procs["prefect-server"], logs / "prefect-server.log", timeout)
        if serve_mlflow:
            _wait("the MLflow UI", lambda: _http(urls["mlflow_ui"] + "/health") == "OK", procs["mlflow-ui"],
                  logs / "mlflow-ui.log", timeout)
        import s3fs

        fs = s3fs.S3FileSystem(key=key, secret=secret, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": urls["s3_endpoint"], "region_name": region})
        _wait(f"creating bucket {BUCKET}", lambda: fs.exists(BUCKET) or fs.mkdir(BUCKET) or True, None,
              logs / "s3.log", 60)
        echo(f"creating work pool '{POOL}' and deploying prefect.yaml (log: {logs / 'deploy.log'})")
        _run("creating the work pool", [prefect, "--no-prompt", "work-pool", "create", POOL, "--type", "process",
                                        "--overwrite"], env, logs / "deploy.log", timeout)
        _run("prefect deploy", [prefect, "--no-prompt", "deploy", "--all"], env, logs / "deploy.log", timeout)
        echo(f"starting a worker on pool '{POOL}'")
        spawn("worker", [prefect, "--no-prompt", "worker", "start", "--pool", POOL, "--name", "diffsae-local"], ROOT)
        _wait("the worker", lambda: bool(_http(f"{urls['prefect_api']}/work_pools/{POOL}/workers/filter", {})),
              procs["worker"], logs / "worker.log", timeout)
        deployments = _deployment_names(urls["prefect_api"])
    except BaseException as e:
        echo("start failed: stopping what was started")
        stop(root, echo=lambda _: None)
        if isinstance(e, Exception) and not isinstance(e, ServeError):
            raise ServeError(f"{type(e).__name__}: {e}") from e
        raise
    info = {**urls, "bucket": f"s3://{BUCKET}", "mlflow_tracking_uri": mlflow_uri, "env_file": str(env_file),
            "env": client_env, "prefect_home": home, "deployments": deployments,
            "pids": {e["name"]: e["pid"] for e in (read_pids(root) or {"processes": []})["processes"]}}
    echo(summary(info, root))
    return info


def _deployment_names(api: str) -> list[str]:
    flows = {f["id"]: f["name"] for f in _http(f"{api}/flows/filter", {})}
    return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in _http(f"{api}/deployments/filter", {}))


def summary(info: dict[str, Any], root: Path) -> str:
    env_file, run = info["env_file"], ".venv/bin/prefect deployment run 'diffsae-pipeline/pipeline'"
    env_file = env_file if os.path.relpath(env_file).startswith("..") else os.path.relpath(env_file)
    return f"""
diffsae services are running (pids: {pid_file(root)}, logs: {state_dir(root) / 'logs'}):
  Prefect UI   {info['prefect_ui']}
  MLflow UI    {info['mlflow_ui']}    (tracking store {info['mlflow_tracking_uri']})
  S3 endpoint  {info['s3_endpoint']}    bucket {info['bucket']}; credentials: source {env_file}
  worker       pool '{POOL}'; deployments: {', '.join(info['deployments'])}

Launch a run:
  UI:  Deployments -> pipeline (diffsae-pipeline) -> Run -> Custom run: fill in the config form
       (Quick run, or an empty form, runs the built-in demo pair into ./diffsae-data)
  CLI: source {env_file}
       {run} --watch
       {run} --param config='{{"run": "mine", "store": "{info['bucket']}/diffsae"}}' --watch
Stop everything: make stop"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.serve", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--store", default="./diffsae-data", help="Local store whose MLflow db the UI shows")
    args = parser.parse_args(argv)  # (importing `flows` turned telemetry off)
    try:
        if args.command == "start":
            start(ROOT, ports_from_env(), args.store)
        elif args.command == "stop":
            stop(ROOT)
        else:
            print("\n".join(f"{e['name']}: pid {e['pid']}" for e in running(ROOT)) or "not running")
    except ServeError as e:
        print(f"diffsae serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsae serve: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
