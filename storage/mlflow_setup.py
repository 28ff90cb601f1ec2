"""MLflow setup: one experiment per run name, artifacts on the run's store.

Tracking: `MLFLOW_TRACKING_URI` when set (a server), else a local SQLite file: `<store>/mlflow.db` for local
stores, `~/.cache/diffsae/mlflow.db` for S3 stores. Artifacts: `<store>/runs/<run>/mlflow/` (s3:// artifacts use
`MLFLOW_S3_ENDPOINT_URL`, set from the store's endpoint). Open the UI with
`mlflow ui --backend-store-uri sqlite:///diffsae-data/mlflow.db`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from storage.paths import RunPaths, is_s3
from storage.store import s3_endpoint


def tracking_uri(paths: RunPaths) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_s3(paths.store_root):
        folder = Path(os.environ.get("DIFFSAE_CACHE_DIR") or Path.home() / ".cache" / "diffsae")
    else:
        folder = Path(paths.store_root)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def experiment(paths: RunPaths) -> Any:
    """Point MLflow at the run's tracking store and experiment (created with its artifacts on the store)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    endpoint = s3_endpoint()
    if is_s3(paths.store_root) and endpoint:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    name = f"diffsae-{paths.run}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        mlflow.create_experiment(name, artifact_location=paths.url("mlflow"))
    return mlflow.set_experiment(name)


def flat_params(prefix: str, obj: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}{k}": str(v) for k, v in obj.items()}
