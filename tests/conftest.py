"""Shared fixtures: a real SeaweedFS S3 server on free ports, fresh buckets, telemetry off, isolated Prefect."""

from __future__ import annotations

import os
import uuid
from typing import Iterator, NamedTuple

import pytest

# Telemetry off and an isolated Prefect home for every test process (set before prefect is imported).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
if "PREFECT_HOME" not in os.environ or os.environ.get("CI"):
    import atexit
    import shutil
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diffsae-prefect-")
    os.environ["DIFFSAE_CACHE_DIR"] = os.path.join(os.environ["PREFECT_HOME"], "cache")
    # the session's Prefect database and model cache (GBs of dequantized checkpoints) go with the session
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


class S3Info(NamedTuple):
    endpoint_url: str
    key: str
    secret: str

    def new_bucket(self) -> str:
        import s3fs

        name = f"t-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            client_kwargs={"endpoint_url": self.endpoint_url},
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Info]:
    """A real SeaweedFS server bound to 127.0.0.1 on free ports, credentials in the environment."""
    from services.s3server import S3Server

    key, secret = "diffsae-test", "diffsae-test-secret"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = key, secret
    os.environ.setdefault("AWS_REGION", "us-east-1")
    srv = S3Server(str(tmp_path_factory.mktemp("seaweed")))
    srv.start()
    os.environ["AWS_ENDPOINT_URL"] = srv.endpoint_url
    try:
        yield S3Info(srv.endpoint_url, key, secret)
    finally:
        srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_store(s3_server: S3Info) -> str:
    """A fresh s3://bucket/prefix store URL on the test server."""
    return f"s3://{s3_server.new_bucket()}/store"


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: os.PathLike) -> str:
    """Parametrises a test over a local folder store and a real S3 store."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny real Llama pair + tokenizer + prompts.jsonl (see tests/tiny.py); returns its folder."""
    from tests.tiny import make_pair, make_prompts

    root = tmp_path_factory.mktemp("tiny_pair")
    make_pair(root)
    make_prompts(root / "prompts.jsonl")
    return root


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The built-in planted pair exactly as `make demo` builds it (demo preset, seed 0, audit mix; ~200 s):
    a organisms.demo_pair.DemoPairResult, shared by the slow tests that need the real demo pair. Built with 2 torch
    threads whoever asks first (float sums, hence the weights, depend on the thread count), as on our 2-core
    machines where the figures of docs/EVALUATION.md were measured."""
    import torch

    from organisms.demo_pair import build_demo_pair

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path_factory.mktemp("demo_pair") / "demo-0-audit"
        return build_demo_pair(out, preset="demo", seed=0, mix="audit")
    finally:
        torch.set_num_threads(before)
