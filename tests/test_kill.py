"""However `diffsae run` ends, no process it started outlives it: killed mid-run with SIGKILL (a user's `kill -9`,
the OOM killer) or SIGTERM, neither of which runs any clean-up code, interrupted by Ctrl-C, or run to the end.

Without PREFECT_API_URL the run starts a temporary Prefect API server (a uvicorn subprocess); it used to be stopped
by an atexit hook only, and so lived on forever, re-parented to PID 1, after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # a dependency of distributed (prefect-dask)
import pytest
import yaml

from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 1}
# Runs that get killed train for minutes (3000 epochs of the tiny split: ~2 min here), so the signal lands mid-run
# however late this process sees the first shard: the rest of a 1-epoch tiny run takes ~8 s, and a SIGTERM that lands
# after the pipeline's code has returned is not a mid-run kill (Prefect then ignores it while it reports the final
# state, and the run exits 0 with every result written: the likely cause of one CI failure).
LONG_SAE = {**SAE, "epochs": 3000}
MID_RUN = "Task run 'extract-shard-"  # on stderr: the Prefect server is up and the first shard is done


def _start(cfg: dict, tmp: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m flows.cli run --config CFG` in a session of its own, with its own Prefect home and no API URL (the
    run starts its temporary server); stdout and stderr go to files. Returns the process and its stderr file."""
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env["PREFECT_HOME"] = str(tmp / "prefect")
    err = tmp / "stderr.txt"
    with open(tmp / "stdout.txt", "w") as out_f, open(err, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out_f,
            stderr=err_f,
            start_new_session=True,
        )
    return proc, err


def _wait_mid_run(proc: subprocess.Popen, err: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if MID_RUN in err.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it got going:\n{err.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"the run did not start within {timeout} s:\n{err.read_text()[-3000:]}")


def _start_mid_run(cfg: dict, tmp: Path) -> tuple[subprocess.Popen, Path, dict[psutil.Process, str]]:
    """`diffsae run` started and waited for until it is mid-run, with its descendants (the server among them)."""
    proc, err = _start(cfg, tmp)
    try:
        _wait_mid_run(proc, err)
        descendants = _descendants(proc.pid)
        assert _has_server(descendants), f"no temporary Prefect server among {list(descendants.values())}"
    except BaseException:
        _cleanup(proc, list(_descendants(proc.pid)) if proc.poll() is None else [])
        raise
    return proc, err, descendants


def _descendants(pid: int) -> dict[psutil.Process, str]:
    """Every descendant of process `pid` (children, their children, ...) with its command line."""
    found = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            found[p] = " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # already gone
            pass
    return found


def _has_server(procs: dict[psutil.Process, str]) -> bool:
    return any("uvicorn" in cmd or "flows.server" in cmd for cmd in procs.values())


def _alive(procs: list[psutil.Process]) -> list[str]:
    """The processes of `procs` still running (zombies waiting to be reaped count as gone), one line each."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _cleanup(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """Kill whatever this test started and is still running, so a failure leaks nothing into later tests."""
    if proc.poll() is None:
        proc.kill()
    for p in procs:
        try:
            if p.is_running():
                p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


GRANDCHILD = """
import os, sys, time
import flows.server as s
if sys.argv[1] == "watchdog":
    s._set_parent_death_signal = lambda: False  # the fallback of platforms without PR_SET_PDEATHSIG
s.die_with_parent(os.getppid())
print("ready", flush=True)
time.sleep(120)
"""
MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_die_with_parent(mode: str) -> None:
    """The mechanism alone: a process that called `die_with_parent` dies within a second or two of its parent's
    SIGKILL, by the kernel's parent-death signal (Linux) or by the parent-pid watchdog (elsewhere)."""
    if mode == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, GRANDCHILD, mode], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    grandchild: list[psutil.Process] = []
    try:
        assert middle.stdout is not None
        grandchild.append(psutil.Process(int(middle.stdout.readline())))
        assert middle.stdout.readline().strip() == "ready"
        middle.kill()
        middle.wait(timeout=10)
        assert not _wait_gone(grandchild, timeout=5), f"{mode}: the child outlived its parent"
    finally:
        _cleanup(middle, grandchild)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, runner",
    [(signal.SIGKILL, "local"), (signal.SIGTERM, "local"), (signal.SIGKILL, "dask")],
    ids=lambda v: getattr(v, "name", v),
)
def test_killed_run_leaves_no_process(sig: signal.Signals, runner: str, tiny_pair: Path, tmp_path: Path) -> None:
    """Also with a local Dask cluster (its scheduler in the run's process, a nanny-spawned process per worker).
    (Ray is left out: its local cluster fate-shares with the run too, but the raylet's two agent processes keep
    trying to reach the dead GCS for about a minute before they exit.)"""
    extract = {"runner": runner, "n_workers": 2, "shard_tokens": 150} if runner != "local" else {}
    cfg = tiny_config(tiny_pair, str(tmp_path / "store"), sae=LONG_SAE, attribution={"steps": 2}, extract=extract)
    proc, err, descendants = _start_mid_run(cfg, tmp_path)
    try:
        if runner == "dask":
            workers = [cmd for cmd in descendants.values() if "multiprocessing.spawn" in cmd]
            assert len(workers) == 2, f"no Dask workers among {list(descendants.values())}"
        os.kill(proc.pid, sig)  # the `diffsae run` process only, not its group: `kill -9 PID`
        proc.wait(timeout=60)
        assert proc.returncode != 0, f"{sig.name} mid-run, yet the run exited 0:\n{err.read_text()[-4000:]}"
        left = _wait_gone(list(descendants), timeout=10)
        assert not left, f"{sig.name}: processes left behind by `diffsae run`:\n" + "\n".join(left)
    finally:
        _cleanup(proc, list(descendants))


@pytest.mark.slow
def test_ctrl_c_interrupts_the_run_cleanly_and_leaves_no_process(tiny_pair: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group. The run reports its crash and exits 130
    ("interrupted") within seconds. With Prefect's own server, which died of the same SIGINT, it spent about 70 s
    retrying to reach it and then exited 3, blaming the store."""
    cfg = tiny_config(tiny_pair, str(tmp_path / "store"), sae=LONG_SAE, attribution={"steps": 2})
    proc, err, descendants = _start_mid_run(cfg, tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 120 s after Ctrl-C:\n{err.read_text()[-3000:]}")
        stderr = err.read_text()
        assert proc.returncode == 130 and "diffsae: interrupted" in stderr, stderr[-3000:]
        left = _wait_gone(list(descendants), timeout=10)
        assert not left, "Ctrl-C: processes left behind by `diffsae run`:\n" + "\n".join(left)
    finally:
        _cleanup(proc, list(descendants))


@pytest.mark.slow
def test_completed_run_leaves_no_process(tiny_pair: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_pair, str(tmp_path / "store"), sae=SAE, attribution={"steps": 2})
    proc, err = _start(cfg, tmp_path)
    seen: dict[psutil.Process, str] = {}
    try:
        while proc.poll() is None:  # every process the run starts, while it runs
            try:
                found = _descendants(proc.pid)
            except psutil.NoSuchProcess:
                break
            seen.update({p: cmd for p, cmd in found.items() if not seen.get(p)})  # a zombie's command line is ''
            time.sleep(0.2)
        assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
        assert _has_server(seen), f"no temporary Prefect server among {list(seen.values())}"
        left = _wait_gone(list(seen), timeout=10)
        assert not left, "processes left behind by a completed `diffsae run`:\n" + "\n".join(left)
    finally:
        _cleanup(proc, list(seen))


def test_a_swallowed_ctrl_c_is_raised_again_at_the_next_stage() -> None:
    """`diffsae run`'s SIGINT handler remembers the interrupt: if the KeyboardInterrupt it raises is lost on its way
    out (once in ~4 runs of the Ctrl-C test above, while fast extraction shards ran, the run went on to train), the
    next stage boundary raises it again, before the stage runs."""
    from tasks import common

    common.raise_if_interrupted()  # not interrupted: nothing happens
    try:
        with pytest.raises(KeyboardInterrupt):
            common.interrupt_handler(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            common.call_stage(None, None, False, {}, "train")  # type: ignore[arg-type]  # never reaches the task
    finally:
        common._INTERRUPTED.clear()
