"""MLflow setup: one experiment per run (store and run name), artifacts on the run's store.

Tracking: `MLFLOW_TRACKING_URI` when set (a server), else a local SQLite file: `<store>/mlflow.db` for local
stores, `<local cache>/mlflow.db` for S3 stores (DIFFSAE_CACHE_DIR or ~/.cache/diffsae). Artifacts:
`<store>/runs/<run>/mlflow/`; s3:// artifacts use `MLFLOW_S3_ENDPOINT_URL`, set from the run context's endpoint.
Open the UI with `mlflow ui --backend-store-uri sqlite:///diffsae-data/mlflow.db`.

Experiment name: `diffsae-<run>` on a local store (its tracking db is the store's own), `diffsae-<run> @ <store URL>`
on an S3 store, whose tracking db on this machine is shared by every store: two S3 stores with the same run name
would otherwise share one experiment, whose artifacts live on the first store only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsae.config import local_cache_dir
from storage.paths import RunPaths, is_s3

if TYPE_CHECKING:
    from storage.context import RunContext


def tracking_uri(paths: RunPaths) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_s3(paths.store_root):
        folder = local_cache_dir()
    else:
        folder = Path(paths.store_root)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def experiment(ctx: "RunContext") -> Any:
    """Point MLflow at the run's tracking store and experiment (created with its artifacts on the store)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if ctx.is_s3 and ctx.endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = ctx.endpoint_url
    import mlflow

    paths = ctx.paths
    mlflow.set_tracking_uri(tracking_uri(paths))
    name = experiment_name(ctx)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        mlflow.create_experiment(name, artifact_location=paths.url("mlflow"))
    return mlflow.set_experiment(name)


def experiment_name(ctx: "RunContext") -> str:
    return f"diffsae-{ctx.run} @ {ctx.store_url}" if ctx.is_s3 else f"diffsae-{ctx.run}"


def flat_params(prefix: str, obj: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}{k}": str(v) for k, v in obj.items()}
