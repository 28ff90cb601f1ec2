"""The run context carries the store's endpoint to every task, and a run's store is self-contained: a second
machine (another HOME, the prompts file elsewhere) reruns a changed stage from what the store holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from diffsae.config import PipelineConfig
from storage.context import RunContext
from tasks.models import MODEL_CACHE
from tests.tiny import tiny_config

SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2}
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


def _states(out: object) -> dict[str, str]:
    return {k: "+".join(sorted(v)) for k, v in out.stages.items()}  # type: ignore[attr-defined]


@pytest.mark.slow
def test_endpoint_from_config_only(tiny_pair: Path, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`s3_endpoint_url` in the config and no endpoint variable: every stage (Prefect results, shards, MLflow
    artifacts, DuckDB ranking, dashboards) reaches the real SeaweedFS server."""
    from flows.pipeline import pipeline

    store = f"s3://{s3_server.new_bucket()}/store"
    for var in ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = PipelineConfig.from_dict(
        {**tiny_config(tiny_pair, store, sae=SAE, attribution={"steps": 2}), "s3_endpoint_url": s3_server.endpoint_url}
    )
    ctx = RunContext.from_config(cfg)
    assert ctx.endpoint_url == s3_server.endpoint_url
    out = pipeline(config=cfg)
    assert all(v == {"Completed": 1} for k, v in out.stages.items() if k != "extract"), out.stages
    assert ctx.store.exists(out.dashboards.index)
    assert ctx.store.glob(ctx.paths.url(".prefect", "*"))  # Prefect's records went to the store too
    assert ctx.store.glob(ctx.paths.url("mlflow", "*", "artifacts", "sae", "*"))  # and MLflow's artifacts
    assert ctx.duck().execute("SELECT count(*) FROM latents").fetchone()[0] == out.ranking.n_latents


@pytest.mark.slow
def test_second_machine_reruns_attribution_only(
    tiny_pair: Path, s3_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import pipeline
    from flows.stages import train_flow

    pair = tmp_path / "pair"  # the models stay where they are (the config names them); the prompts move
    shutil.copytree(tiny_pair, pair)
    monkeypatch.setenv("HOME", str(tmp_path / "home-1"))
    monkeypatch.setenv("DIFFSAE_CACHE_DIR", str(tmp_path / "home-1" / ".cache"))
    settings = tiny_config(pair, s3_store, sae=SAE, attribution={"steps": 2})
    _, states = train_flow(config=PipelineConfig.from_dict(settings))
    assert states["train"] == {"Completed": 1}

    # The store holds no path the pipeline derived on the first machine (prompts file, HOME, caches, mirrors);
    # the models are named as the config names them.
    ctx = RunContext.create(s3_store, "t")
    manifest = json.dumps(ctx.store.read_json(ctx.paths.activations_manifest))
    for local in (str(pair / "prompts.jsonl"), str(tmp_path / "home-1"), "/.cache/", "mirror"):
        assert local not in manifest, manifest
    data = json.loads(manifest)["data"]["path"]
    assert data.startswith("<store>/cache/inputs/") and ctx.store.exists(data.replace("<store>", ctx.store_url))

    # "Another machine": a new HOME and cache, nothing loaded in this process, the prompts file moved away.
    moved = tmp_path / "elsewhere" / "prompts.jsonl"
    moved.parent.mkdir()
    shutil.move(pair / "prompts.jsonl", moved)
    monkeypatch.setenv("HOME", str(tmp_path / "home-2"))
    monkeypatch.setenv("DIFFSAE_CACHE_DIR", str(tmp_path / "home-2" / ".cache"))
    MODEL_CACHE.clear()
    settings["data"] = {**settings["data"], "path": str(moved)}
    out = pipeline(config=PipelineConfig.from_dict({**settings, "attribution": {"steps": 3}}))
    st = _states(out)
    assert st["extract"] == st["commit_activations"] == st["train"] == "Cached", st
    assert st["attribute"] == st["commit_attribution"] == st["rank"] == st["dashboards"] == "Completed", st
    metrics = dict(ctx.duck().execute("SELECT name, value FROM metrics").fetchall())
    assert metrics["attribution_steps"] == 3.0
    assert metrics["completeness_max_rel_error"] < 0.5


def test_same_run_name_on_two_s3_stores_has_two_experiments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 stores share this machine's MLflow tracking db: each (store, run) gets its own experiment, with its
    artifacts on its own store (one experiment per run name sent the second store's artifacts to the first)."""
    import mlflow

    monkeypatch.setenv("DIFFSAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = RunContext.create("s3://bucket-a/team", "demo"), RunContext.create("s3://bucket-b/team", "demo")
    exp_a, exp_b = a.mlflow_experiment(), b.mlflow_experiment()
    assert exp_a.experiment_id != exp_b.experiment_id
    assert exp_a.artifact_location == a.paths.url("mlflow") and exp_b.artifact_location == b.paths.url("mlflow")
    assert a.mlflow_experiment().experiment_id == exp_a.experiment_id  # found again, not duplicated
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'cache' / 'mlflow.db'}"
    local = RunContext.create(str(tmp_path / "store"), "demo")
    assert local.mlflow_experiment().name == "diffsae-demo"  # a local store's db is its own
