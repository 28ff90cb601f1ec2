"""Stage flows: each stage of the pipeline as a flow of its own (a deployment entry point and a subflow of
`pipeline`). They hold the DAG only: which tasks run, in which order, on whose outputs; tasks do the work.

Every stage asks whether its output is still on the store; if not, its task is forced to recompute even when
Prefect holds a cache record (the output was deleted or corrupted).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from prefect import flow

from diffsae.config import PipelineConfig
from flows.runners import on_cluster
from storage.lock import RunLock
from storage.paths import RunPaths
from storage.ranking import sql_fingerprint
from storage.store import Store
from tasks import analyse as an
from tasks import dashboards as db
from tasks import extract as ex
from tasks import pair as pr
from tasks import train as tr
from tasks.common import call_stage, collect_stage, guarded, stable_hash, submit_stage


def _ctx(cfg: PipelineConfig) -> tuple[RunPaths, Store]:
    return RunPaths(cfg.store, cfg.run), Store(cfg.store, cfg.s3_endpoint_url)


@contextmanager
def locked(cfg: PipelineConfig) -> Iterator[None]:
    """Hold the run's lock on the store for the whole flow (same-name runs never interleave)."""
    paths, store = _ctx(cfg)
    with RunLock(store, paths, wait=cfg.lock_wait_s):
        yield


def resolve_pair(cfg: PipelineConfig, states: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The run's models and data: the config's, or the built-in demo pair (built once per store)."""
    paths, store = _ctx(cfg)
    pair_dir = None
    if cfg.uses_demo_pair:
        key = pr.demo_key(cfg.demo)
        ok = guarded(lambda: pr.demo_pair_ok(store, paths, cfg.demo))
        out = call_stage(
            pr.build_demo_pair_task,
            paths,
            ok,
            states,
            "demo_pair",
            results_url=paths.cache_dir(".prefect"),  # the pair is store-wide: so are its cache records
            store_root=paths.store_root,
            demo=cfg.demo.model_dump(),
            key=key,
        )
        pair_dir = pr.local_copy(store, out["url"], key)
    models, data = pr.resolved_models(cfg, pair_dir)
    return {"models": models, "data": data}


@flow(name="extract", log_prints=True)
def extract_flow(config: PipelineConfig) -> dict[str, Any]:
    """Stage 1: activation differences and per-token KL to Parquet shards, then the manifest."""
    states: dict[str, dict[str, int]] = {}
    with locked(config):
        out = _extract(config, states)
    return {**{k: v for k, v in out.items() if k not in ("models", "data")}, "stages": states}


def _extract(cfg: PipelineConfig, states: dict[str, dict[str, int]]) -> dict[str, Any]:
    from diffsae.models import model_fingerprint

    paths, store = _ctx(cfg)
    pair = resolve_pair(cfg, states)
    models, data = pair["models"], pair["data"]
    fps = (
        model_fingerprint(models.base, models.revision),
        model_fingerprint(models.finetuned, models.revision),
    )
    plan = ex.plan_extraction(models, data.path, data.max_tokens_per_doc, data.max_docs, cfg.extract, fps)
    ctx = ex.ShardCtx(
        models.model_dump_json(),
        data.path,
        data.max_tokens_per_doc,
        data.max_docs,
        cfg.extract.model_dump_json(),
        len(plan.shards),
    )
    if cfg.extract.runner != "local":
        digests = _extract_on_cluster(cfg, plan.shards, ctx, states)
    else:
        digests = []
        for spec in plan.shards:
            ok = guarded(lambda: ex.shard_ok(store, paths, spec, cfg.extract.verify))
            rec = call_stage(
                ex.extract_shard,
                paths,
                ok,
                states,
                "extract",
                store_root=paths.store_root,
                run=cfg.run,
                spec=spec,
                ctx=ctx,
            )
            digests.append(rec["sha256"])
    meta = {
        "data_path": data.path,
        "tokenizer": models.finetuned,
        "max_tokens": data.max_tokens_per_doc,
        "max_docs": data.max_docs,
        "layer": models.layer,
        "base": models.base,
        "finetuned": models.finetuned,
        "model_fingerprints": list(fps),
        "extract": cfg.extract.model_dump(exclude=EXECUTION_ONLY),
        "tokens": plan.n_tokens,
    }
    ok = guarded(lambda: ex.manifest_ok(store, paths, plan.data_key))
    out = call_stage(
        ex.commit_activations,
        paths,
        ok,
        states,
        "commit_activations",
        store_root=paths.store_root,
        run=cfg.run,
        shard_keys=[s.key for s in plan.shards],
        shard_digests=digests,
        plan_key=plan.data_key,
        meta=meta,
    )
    return {**out, "models": models, "data": data}


# Extract settings that say where shards run, not what they hold: kept out of the manifest (and its cache key).
EXECUTION_ONLY = {"runner", "cluster_address", "n_workers"}


def _extract_on_cluster(
    cfg: PipelineConfig, shards: list[ex.ShardSpec], ctx: ex.ShardCtx, states: dict[str, dict[str, int]]
) -> list[str]:
    """The shard tasks in parallel on `cfg.extract.runner` (Dask or Ray); returns their sha256 in shard order.

    Same cache semantics as the local loop: a shard whose file is missing or fails its check is recomputed."""
    paths, store = _ctx(cfg)
    oks = [guarded(lambda s=spec: ex.shard_ok(store, paths, s, cfg.extract.verify)) for spec in shards]
    with on_cluster(cfg.extract) as runner:
        futures = [
            submit_stage(
                runner, ex.extract_shard, paths, ok, store_root=paths.store_root, run=cfg.run, spec=spec, ctx=ctx
            )
            for spec, ok in zip(shards, oks)
        ]
        for future in futures:  # every shard finishes (kept for a resume) before the first failure is raised
            future.wait()
        return [collect_stage(future, states, "extract")["sha256"] for future in futures]


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig) -> dict[str, Any]:
    """Stage 2: the BatchTopK diff-SAE on the stored activations (extraction runs first if needed)."""
    states: dict[str, dict[str, int]] = {}
    with locked(config):
        return _train(config, _extract(config, states), states)


def _train(
    cfg: PipelineConfig, activations: dict[str, Any], states: dict[str, dict[str, int]]
) -> dict[str, Any]:
    paths, store = _ctx(cfg)
    key = stable_hash(cfg.sae.model_dump(), activations["fingerprint"])
    ok = guarded(lambda: tr.sae_ok(store, paths, key))
    return call_stage(
        tr.train_sae_task,
        paths,
        ok,
        states,
        "train",
        store_root=paths.store_root,
        run=cfg.run,
        sae_cfg=cfg.sae.model_dump(),
        manifest_fingerprint=activations["fingerprint"],
        models=activations["models"].model_dump(),
        key=key,
    )


@flow(name="analyse", log_prints=True)
def analyse_flow(config: PipelineConfig) -> dict[str, Any]:
    """Stages 3-4: KL attribution of every analysed token, then the latent ranking (upstream stages if needed)."""
    states: dict[str, dict[str, int]] = {}
    with locked(config):
        activations = _extract(config, states)
        return _analyse(config, activations, _train(config, activations, states), states)


def _analyse(
    cfg: PipelineConfig, activations: dict[str, Any], sae: dict[str, Any], states: dict[str, dict[str, int]]
) -> dict[str, Any]:
    paths, store = _ctx(cfg)
    akey = stable_hash(an.attribution_key(cfg.attribution, sae, activations["fingerprint"]))
    ok = guarded(lambda: an.analysis_ok(store, paths, akey))
    attribution = call_stage(
        an.attribute_task,
        paths,
        ok,
        states,
        "attribute",
        store_root=paths.store_root,
        run=cfg.run,
        steps=cfg.attribution.steps,
        top_promoted=cfg.attribution.top_promoted,
        sae_key=sae["key"],
        manifest_fingerprint=activations["fingerprint"],
        models=activations["models"].model_dump(),
        skip_first=cfg.extract.skip_first,
        batch_tokens=cfg.extract.batch_tokens,
        key=akey,
    )
    rkey = stable_hash(cfg.attribution.rank_by, akey, sql_fingerprint())  # the SQL files define the scores
    ok = guarded(lambda: an.rank_ok(store, paths, rkey))
    ranking = call_stage(
        an.rank_task,
        paths,
        ok,
        states,
        "rank",
        store_root=paths.store_root,
        run=cfg.run,
        rank_by=cfg.attribution.rank_by,
        skip_first=cfg.extract.skip_first,
        attribution_key=akey,
        key=rkey,
    )
    return {"attribution": attribution, "ranking": ranking}


@flow(name="dashboards", log_prints=True)
def dashboards_flow(config: PipelineConfig) -> dict[str, Any]:
    """Stage 5: the static KL dashboards (upstream stages run first if needed)."""
    states: dict[str, dict[str, int]] = {}
    with locked(config):
        activations = _extract(config, states)
        analysis = _analyse(config, activations, _train(config, activations, states), states)
        return _dashboards(config, analysis, states)


def _dashboards(
    cfg: PipelineConfig, analysis: dict[str, Any], states: dict[str, dict[str, int]]
) -> dict[str, Any]:
    paths, store = _ctx(cfg)
    key = stable_hash(cfg.dashboards.model_dump(), analysis["ranking"]["key"])
    ok = guarded(lambda: db.site_ok(store, paths, key))
    return call_stage(
        db.dashboards_task,
        paths,
        ok,
        states,
        "dashboards",
        store_root=paths.store_root,
        run=cfg.run,
        cfg=cfg.dashboards.model_dump(),
        rank_key=analysis["ranking"]["key"],
        key=key,
    )
