"""A lock on a run: two flows with the same run name never interleave on one store.

The lock is the object `<store>/runs/<run>/LOCK` (JSON: owner id, host, pid, start time, heartbeat). Local stores
create it with O_CREAT|O_EXCL; S3 stores write it when absent and read it back after a short settle time, so of
two writers racing only one keeps it. A lock is stale (and taken over) when its process is gone (same host) or
its heartbeat is older than `ttl` seconds (any host; a live holder refreshes it every ttl/4 seconds).

    with RunLock(store, paths, wait=0):      # wait=0: fail at once with RunLocked; wait>0: poll that long
        ...
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from storage.paths import RunPaths
from storage.store import Store


class RunLocked(RuntimeError):
    """Another flow holds the run (one line)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, store: Store, paths: RunPaths, wait: float = 0.0, ttl: float = 600.0) -> None:
        self.store, self.paths, self.wait, self.ttl = store, paths, wait, ttl
        self.url = paths.lock
        self.me = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- state of the lock object
    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "?", "host": "?", "pid": -1, "since": 0, "beat": 0}

    def _stale(self, info: dict[str, Any]) -> bool:
        if info.get("host") == self.me["host"] and not _alive(int(info.get("pid", -1))):
            return True
        return time.time() - float(info.get("beat", info.get("since", 0))) > self.ttl

    def _payload(self) -> bytes:
        return json.dumps({**self.me, "beat": time.time()}).encode()

    def _try_create(self) -> bool:
        if not self.store.is_s3:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            try:
                fd = os.open(self.url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self.store.exists(self.url):
            return False
        self.store.write_bytes(self.url, self._payload(), "application/json")
        time.sleep(0.5)  # let a racing writer land, then see who won
        info = self._read()
        return bool(info and info.get("owner") == self.me["owner"])

    # -- public API
    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_create():
                break
            info = self._read()
            if info is None:
                continue
            if self._stale(info):
                self.store.delete(self.url)
                continue
            if time.monotonic() >= deadline:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
                raise RunLocked(
                    f"run '{self.paths.run}' is locked by {info.get('host')} pid {info.get('pid')} "
                    f"since {since} ({self.url}); wait for it or pick another run name"
                )
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                info = self._read()
                if info and info.get("owner") == self.me["owner"]:
                    self.store.write_bytes(self.url, self._payload(), "application/json")
            except Exception:
                pass  # a transient store error must not kill the run; the next beat retries

    def release(self) -> None:
        """Delete the lock if we still own it. A store that does not answer leaves it for the stale check."""
        self._stop.set()
        try:
            info = self._read()
            if info and info.get("owner") == self.me["owner"]:
                self.store.delete(self.url)
        except Exception as e:  # noqa: BLE001 - never mask the flow's own outcome
            import logging

            logging.getLogger("diffsae").warning("could not release %s: %s", self.url, e)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
