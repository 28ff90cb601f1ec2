"""A temporary Prefect API server owned by this process: it dies with us, however we end (even by SIGKILL).

Why: without PREFECT_API_URL, Prefect starts a temporary API server itself (`SubprocessASGIServer`, a uvicorn
subprocess) and stops it from an `atexit` hook only. A `diffsae run` killed by SIGKILL (or SIGTERM, or the OOM
killer) never runs that hook, and the server lives on forever, re-parented to PID 1, holding its port and sqlite DB.

`owned_api_server()` starts the very same server (Prefect's `SubprocessASGIServer`: same uvicorn app factory, same
settings and environment, same default sqlite DB under PREFECT_HOME, same port choice, health wait and stop), but
its process first arranges to die with its parent: on Linux the kernel sends it SIGKILL when the parent dies
(`prctl(PR_SET_PDEATHSIG)`), elsewhere a watchdog thread in the server exits once its parent pid changes. It is
set in the server process itself (this module is its entry point, in front of uvicorn's), not in a `preexec_fn`,
which is unsafe in a threaded parent and could not host the watchdog anyway; a parent that died before the server
got that far is caught by a check of the parent pid right after. While the context is open, Prefect is pointed at
that server (PREFECT_API_URL in the settings context, the global settings and the environment, so threads and
worker processes use it too), and it is registered as Prefect's default temporary server, so nothing in Prefect
starts a second, unowned one. Start it from the main thread: Linux's parent-death signal follows the thread that
started the child, not the process.

The server runs in a session of its own, out of reach of the terminal's Ctrl-C: with Prefect's server, Ctrl-C (sent
to the whole foreground process group) killed the server at once, and the interrupted flow then spent about 70 s
retrying to report its crash to it before failing with "connection refused". Now the flow is interrupted, reports
to a live server, and the server is stopped after it (or dies with us, whatever happens).

    with owned_api_server():
        pipeline(config=cfg)

    python -m flows.server --parent PID -- UVICORN_ARGS...   # the server process's entry point (internal)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5
DRAIN_TIMEOUT_S = 10.0


# --- in the server process ---------------------------------------------------------------------------------------


def _set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies. False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)  # the parent is gone: we were re-parented


def die_with_parent(parent: int) -> None:
    """Make this process die as soon as process `parent` (its parent) does: the kernel's parent-death signal on
    Linux, a watchdog thread polling the parent pid elsewhere."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), name="diffsae-parent-watchdog", daemon=True).start()
    if os.getppid() != parent:  # it died before we got here: no signal will come
        os._exit(1)


def _child_main(argv: list[str]) -> None:
    """`python -m flows.server --parent PID -- UVICORN_ARGS...`: tie this process to PID, then run uvicorn."""
    if len(argv) < 3 or argv[0] != "--parent" or argv[2] != "--":
        sys.exit("usage: python -m flows.server --parent PID -- UVICORN_ARGS...")
    die_with_parent(int(argv[1]))
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(args=argv[3:], prog_name="uvicorn")  # exits (status 3 on a start-up failure, as `-m uvicorn`)


# --- in the diffsae process --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _server_class() -> type:
    """Prefect's SubprocessASGIServer whose process is tied to ours (built lazily: the server process imports this
    module too, and should not pay for importing Prefect before it is tied to its parent)."""
    import subprocess

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class OwnedASGIServer(SubprocessASGIServer):
        _instances: dict[int | None, SubprocessASGIServer] = {}  # our own: never hand out Prefect's default

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's SubprocessASGIServer._run_uvicorn_command, with this module in front of uvicorn.
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            uvicorn_args = [
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ]
            return subprocess.Popen(
                args=[sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--", *uvicorn_args],
                env={
                    **os.environ,
                    **server_env,
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                start_new_session=True,  # a terminal's Ctrl-C is ours to handle: we stop the server after the flow
            )

    return OwnedASGIServer


@contextmanager
def _pointed_at(api_url: str) -> Iterator[None]:
    """PREFECT_API_URL = api_url for this context, for threads (the global settings) and for child processes.

    The server serves no UI (as Prefect's own temporary one): PREFECT_UI_URL is blanked unless set, so that flow runs
    do not log "View at" links to pages that do not exist (with the API URL unset, Prefect logged none)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    updates: dict[Any, str] = {PREFECT_API_URL: api_url}
    if PREFECT_UI_URL.value() is None:
        updates[PREFECT_UI_URL] = ""
    old = {s.name: os.environ.get(s.name) for s in updates}
    os.environ.update({s.name: v for s, v in updates.items()})
    refresh_global_settings_context()
    try:
        with temporary_settings(updates):
            yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_global_settings_context()


def _drain_workers() -> None:
    """Send the logs and events still queued to the server before it stops (as Prefect's test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=DRAIN_TIMEOUT_S, at_exit=False)
        except Exception:  # never mask the run's own outcome
            pass


@contextmanager
def owned_api_server() -> Iterator[str | None]:
    """A temporary Prefect API server for the duration of the context, dying with this process; yields its API URL.

    Does nothing (yields None) when PREFECT_API_URL is already set: that server is not ours to start or stop."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield None
        return
    server = _server_class()()
    prior_default = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server  # anything asking Prefect for its temporary server gets ours
    try:
        server.start()
        with _pointed_at(server.api_url):
            try:
                yield server.api_url
            finally:
                _drain_workers()
    finally:
        server.stop()
        if prior_default is not None:
            SubprocessASGIServer._instances[None] = prior_default
        else:
            SubprocessASGIServer._instances.pop(None, None)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
