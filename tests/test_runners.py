"""extract.runner dask / ray: the shard tasks run on a real local cluster (started by the runner, or an existing one
reached by its scheduler address) and give activation tables identical to the local runner's; reruns hit the cache;
each worker process loads the model pair once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from diffsae.config import ConfigError, PipelineConfig
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tests.tiny import tiny_config

N_SHARDS = 5  # the tiny dataset at shard_tokens=400
FRESH = {"extract": {"Completed": N_SHARDS}, "commit_activations": {"Completed": 1}}
CACHED = {"extract": {"Cached": N_SHARDS}, "commit_activations": {"Cached": 1}}


def _extract(tiny_pair: Path, store: str, **extract: Any) -> dict[str, Any]:
    """The extract stage flow on the tiny pair; its output has the per-task state counts under `stages`."""
    from flows.stages import extract_flow

    activations, states = extract_flow(config=PipelineConfig.from_dict(tiny_config(tiny_pair, store, extract=extract)))
    return {**activations._asdict(), "stages": states}


def _tables(store: str) -> dict[str, Any]:
    """The stage's output: manifest, every shard table (sorted by doc_id, pos), docs and tokens tables."""
    paths = RunPaths(store, "t")
    manifest = act.read_manifest(Store(store), paths)
    assert manifest is not None
    order = [("doc_id", "ascending"), ("pos", "ascending")]
    return {
        "manifest": manifest,
        "shards": [pq.read_table(paths.shard(r["index"])).sort_by(order) for r in manifest["shards"]],
        "docs": pq.read_table(paths.url("activations", "docs.parquet")),
        "tokens": pq.read_table(paths.url("activations", "tokens.parquet")).sort_by(order),
    }


def _assert_identical(expected: dict[str, Any], store: str) -> None:
    got = _tables(store)
    # shard records (index, doc range, rows, bytes, sha256, key) and the fingerprint: byte-identical shard files
    assert got["manifest"] == expected["manifest"]
    assert len(got["shards"]) == len(expected["shards"]) == N_SHARDS
    for i, (a, b) in enumerate(zip(got["shards"], expected["shards"])):
        assert a.num_rows > 0 and a.equals(b), f"shard {i} differs"
    assert got["docs"].equals(expected["docs"]) and got["tokens"].equals(expected["tokens"])


def test_runner_config() -> None:
    cfg = PipelineConfig.from_dict({"extract": {"runner": "dask", "cluster_address": "tcp://10.0.0.1:8786"}})
    assert (cfg.extract.cluster_address, cfg.extract.n_workers) == ("tcp://10.0.0.1:8786", 2)
    with pytest.raises(ConfigError, match=r"^config: extract: .*cluster_address is set but runner is local"):
        PipelineConfig.from_dict({"extract": {"cluster_address": "tcp://10.0.0.1:8786"}})
    with pytest.raises(ConfigError, match=r"^config: extract.n_workers: "):
        PipelineConfig.from_dict({"extract": {"runner": "ray", "n_workers": 0}})


@pytest.fixture(scope="module")
def local_run(tiny_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The local runner's tables (the reference)."""
    store = str(tmp_path_factory.mktemp("local") / "store")
    out = _extract(tiny_pair, store, runner="local")
    assert out["stages"] == FRESH
    return {**_tables(store), "out": out}


@pytest.mark.slow
def test_dask_local_cluster_matches_local_runner(tiny_pair: Path, local_run: dict, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    out = _extract(tiny_pair, store, runner="dask", n_workers=2)  # the runner starts and stops a 2-worker cluster
    assert out["stages"] == FRESH
    assert (out["fingerprint"], out["rows"]) == (local_run["out"]["fingerprint"], local_run["out"]["rows"])
    _assert_identical(local_run, store)


@pytest.mark.slow
def test_dask_existing_cluster_loads_models_once(tiny_pair: Path, local_run: dict, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")

    def worker_state() -> tuple[int, int, int]:
        import torch

        from tasks.models import MODEL_CACHE

        return MODEL_CACHE.pair_loads, MODEL_CACHE.pair_hits, torch.get_num_threads()

    store = str(tmp_path / "store")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,  # the runner must connect by address
    ):
        out = _extract(tiny_pair, store, runner="dask", cluster_address=cluster.scheduler_address)
        assert out["stages"] == FRESH
        per_worker = client.run(worker_state)
        print("per worker (pair loads, cache hits, torch threads):", per_worker)
        assert len(per_worker) == 2
        # every shard ran on a worker of this cluster, each worker loaded the pair at most once
        assert sum(m + h for m, h, _ in per_worker.values()) == N_SHARDS, per_worker
        assert all(m == (1 if m + h else 0) for m, h, _ in per_worker.values()), per_worker
        assert all(t == 1 for _, _, t in per_worker.values()), per_worker  # one torch thread per worker process
        _assert_identical(local_run, store)

        # a rerun on the cluster finds every shard in the cache: nothing runs on the workers, the files stay
        assert _extract(tiny_pair, store, runner="dask", cluster_address=cluster.scheduler_address)["stages"] == CACHED
        assert client.run(worker_state) == per_worker
        # a deleted shard is recomputed on the cluster; still at most one model load per worker
        Store(store).delete(RunPaths(store, "t").shard(2))
        again = _extract(tiny_pair, store, runner="dask", cluster_address=cluster.scheduler_address)
        assert again["stages"]["extract"] == {"Cached": N_SHARDS - 1, "Completed": 1}
        after = client.run(worker_state)
        assert sum(m + h for m, h, _ in after.values()) == N_SHARDS + 1, after
        assert all(m == (1 if m + h else 0) for m, h, _ in after.values()), after
        _assert_identical(local_run, store)
        # switching engines keeps the cache too: the local runner finds every shard the cluster wrote
        assert _extract(tiny_pair, store, runner="local")["stages"] == CACHED
        _assert_identical(local_run, store)


@pytest.mark.slow
def test_ray_local_cluster_matches_local_runner(tiny_pair: Path, local_run: dict, tmp_path: Path) -> None:
    pytest.importorskip("prefect_ray")
    store = str(tmp_path / "store")
    out = _extract(tiny_pair, store, runner="ray", n_workers=2)  # the runner starts and stops a local Ray instance
    assert out["stages"] == FRESH
    assert out["fingerprint"] == local_run["out"]["fingerprint"]
    _assert_identical(local_run, store)
