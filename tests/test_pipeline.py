"""The whole flow on a tiny real pair: every stage runs, a rerun is fully cached, deleted outputs are
recomputed, a changed `sae.k` reruns training and what follows but not extraction; local and real S3 stores."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from diffsae.config import PipelineConfig
from flows.pipeline import PipelineResult
from storage.context import RunContext
from storage.paths import RunPaths
from storage.store import Store
from tasks.models import MODEL_CACHE
from tests.tiny import tiny_config

SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2}
ALL = ["extract", "commit_activations", "train", "attribute", "commit_attribution", "rank", "validate", "dashboards"]


def _run(cfg: dict) -> PipelineResult:
    from flows.pipeline import pipeline

    return pipeline(config=PipelineConfig.from_dict(cfg))


def _states(out: PipelineResult) -> dict[str, str]:
    return {k: "+".join(sorted(v)) for k, v in out.stages.items()}


def _check_latent_docs(store: str) -> None:
    """The attribution stage's latent_docs equals the SQL aggregation of latent_tokens, one row per pair."""
    from storage.duck import connect
    from storage.ranking import load_sql, render

    con = connect(RunContext.create(store, "t"))
    rebuilt = render(load_sql("latent_docs.sql"), latent_tokens="latent_tokens", where="true")
    n, pairs, bad = con.execute(f"""
        SELECT (SELECT count(*) FROM latent_docs), (SELECT count(*) FROM ({rebuilt})), count(*)
        FROM latent_docs AS a FULL JOIN ({rebuilt}) AS b USING (latent_id, doc_id)
        WHERE a.n_tokens IS DISTINCT FROM b.n_tokens OR a.act_max IS DISTINCT FROM b.act_max
           OR a.attr_max IS DISTINCT FROM b.attr_max OR NOT abs(a.attr_sum - b.attr_sum) <= 1e-6
           OR NOT abs(a.act_sum - b.act_sum) <= 1e-4 * b.act_sum""").fetchone()
    assert n == pairs > 0 and bad == 0, (n, pairs, bad)


@pytest.mark.slow
def test_pipeline_rerun_semantics(tiny_pair: Path, any_store: str) -> None:
    cfg = tiny_config(tiny_pair, any_store, sae=SAE, attribution={"steps": 4})
    paths, store = RunPaths(any_store, "t"), Store(any_store)

    t0 = time.perf_counter()
    first = _run(cfg)
    first_wall = time.perf_counter() - t0
    assert _states(first) == {k: "Completed" for k in ALL}
    assert store.exists(first.dashboards.index)
    assert first.ranking.n_latents > 0
    for table in ("tokens", "latent_tokens", "latent_docs", "latents", "docs", "metrics"):
        assert store.glob(paths.table(table)), table
    _check_latent_docs(any_store)

    MODEL_CACHE.clear()
    loads = MODEL_CACHE.pair_loads
    t0 = time.perf_counter()
    again = _run(cfg)
    again_wall = time.perf_counter() - t0
    assert _states(again) == {k: "Cached" for k in ALL}
    assert MODEL_CACHE.pair_loads == loads  # no model was loaded
    assert again_wall <= max(0.05 * first_wall, 20.0), (first_wall, again_wall)
    print(f"first run {first_wall:.1f} s, cached rerun {again_wall:.1f} s (in-flow {again.seconds:.1f} s)")

    # a lost Prefect record is no reason to recompute: the stage's marker on the store is the truth
    store.delete_tree(paths.prefect_results)
    out = _run(cfg)
    assert MODEL_CACHE.pair_loads == loads and _states(out) == {k: "Completed" for k in ALL}  # ran, from markers

    # a deleted stage output is recomputed, not reported cached
    store.delete(paths.url("sae", "metrics.json"))
    store.delete(f"{paths.dashboards_dir}/index.html")
    out = _run(cfg)
    assert _states(out)["extract"] == "Cached" and _states(out)["train"] == "Completed"
    assert _states(out)["dashboards"] == "Completed"
    assert store.exists(f"{paths.dashboards_dir}/index.html")

    # changing sae.k: extraction cached; training, attribution, ranking and dashboards run again
    out = _run(tiny_config(tiny_pair, any_store, sae={**SAE, "k": 3}, attribution={"steps": 4}))
    st = _states(out)
    assert st["extract"] == "Cached" and st["commit_activations"] == "Cached"
    assert all(st[k] == "Completed" for k in ALL[2:]), st


@pytest.mark.slow
def test_failed_stage_reruns_with_upstream_cached(tiny_pair: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.attribute as attribution

    cfg = tiny_config(tiny_pair, str(tmp_path / "store"), sae=SAE, attribution={"steps": 2})
    calls = []

    def broken(*args, **kwargs):  # fault injection: the attribution stage crashes
        calls.append(1)
        raise ValueError("injected fault in attribution")

    monkeypatch.setattr(attribution, "promoted_suppressed", broken)  # used by the attribution's commit only
    with pytest.raises(ValueError, match="injected fault"):
        _run(cfg)
    assert len(calls) == 1  # not an I/O error: no retries
    monkeypatch.undo()
    out = _run(cfg)
    st = _states(out)
    assert st["extract"] == st["commit_activations"] == st["train"] == "Cached", st
    assert st["attribute"] == "Cached", st  # the shards finished before the commit failed
    assert st["commit_attribution"] == st["rank"] == st["dashboards"] == "Completed", st


def test_retry_condition_only_for_transient_io() -> None:
    from tasks.common import is_transient

    class EndpointConnectionError(Exception):  # botocore's name; matched by name
        pass

    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert is_transient(TimeoutError())
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = EndpointConnectionError("endpoint down")
    assert is_transient(wrapped)
    assert not is_transient(ValueError("bad data"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(None)
