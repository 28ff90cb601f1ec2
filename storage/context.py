"""The run context: everything a task needs to reach a run's outputs, in one frozen, serialisable value.

A flow builds it once from the config (`RunContext.from_config`) and hands it to every task, which asks it for the
store, the paths, a DuckDB connection or the MLflow experiment -- in the spirit of a Dagster resource. It holds no
secret and no machine-local state: a task on another machine (a Dask or Ray worker, a rerun elsewhere) gets the
same store from it. Credentials are never part of it: `credentials` says where they come from.

    ctx = RunContext.create("s3://bucket/team", "demo", endpoint_url="http://127.0.0.1:8333")
    ctx.store.read_json(ctx.paths.url("sae", "metrics.json"))
    ctx.duck().sql("SELECT count(*) FROM latents")
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from diffsae.config import local_cache_dir
from storage import duck
from storage.mlflow_setup import experiment
from storage.paths import DEFAULT_METHOD, RunPaths, is_s3, normalize_root
from storage.store import Store, s3_endpoint

_STORES: dict[tuple[str, str | None], Store] = {}  # one Store (and S3 connection pool) per process and root


@dataclass(frozen=True)
class RunContext:
    store_url: str  # normalised root: an absolute local folder or s3://bucket/prefix
    run: str  # run name: outputs live under <store_url>/runs/<run>/
    endpoint_url: str | None = None  # S3 endpoint, resolved once (None: local store, or the default AWS endpoint)
    credentials: Literal["env"] = "env"  # S3 credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE
    method: str = DEFAULT_METHOD  # the method whose stage outputs `paths` points at (storage/paths.py)

    @classmethod
    def create(cls, store: str, run: str, endpoint_url: str | None = None) -> "RunContext":
        root = normalize_root(store)
        return cls(root, run, s3_endpoint(endpoint_url) if is_s3(root) else None)

    @classmethod
    def from_config(cls, cfg: Any) -> "RunContext":
        """From a diffsae.config.PipelineConfig (its store, run and s3_endpoint_url)."""
        return cls.create(cfg.store, cfg.run, cfg.s3_endpoint_url)

    @property
    def is_s3(self) -> bool:
        return is_s3(self.store_url)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.store_url, self.run, self.method)

    def for_method(self, method: str) -> "RunContext":
        """The same run, seen from `method`'s stage outputs (its `sae/`, `analysis/`, `dashboards/`)."""
        return replace(self, method=method)

    @property
    def store(self) -> Store:
        key = (self.store_url, self.endpoint_url)
        if key not in _STORES:
            _STORES[key] = Store(self.store_url, self.endpoint_url)
        return _STORES[key]

    def portable(self, location: str | None) -> str | None:
        """`location` as recorded on the store and in keys: `<store>/<path>` for anything on this store, so the
        same content on another store (or the same store seen from another machine) reads and hashes the same."""
        if location is not None and location.startswith(self.store_url + "/"):
            return "<store>/" + location[len(self.store_url) + 1 :]
        return location

    def duck(self, harden: bool = True) -> Any:
        """An in-memory DuckDB connection with one view per existing table of the run (storage/duck.py)."""
        return duck.connect(self, harden_connection=harden)

    def mlflow_experiment(self) -> Any:
        """MLflow pointed at this run's experiment (storage/mlflow_setup.py)."""
        return experiment(self)

    def mirror(self, url: str) -> str:
        """A local folder holding the store folder `url` (itself on a local store; else a copy in the local
        cache)."""
        return self.store.mirror(url, str(local_cache_dir() / "mirror"))
