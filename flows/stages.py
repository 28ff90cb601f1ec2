"""Stage flows: each stage of the pipeline as a flow of its own (a deployment entry point and a subflow of
`pipeline`). They hold the DAG only: which tasks run, in which order, on whose outputs; tasks do the work.

Every stage asks whether its output is still on the store; if not, its task is forced to recompute even when
Prefect holds a cache record (the output was deleted or corrupted).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from diffsae.config import PipelineConfig
from storage.paths import RunPaths
from storage.store import Store
from tasks import extract as ex
from tasks import pair as pr
from tasks.common import call_stage, guarded


def _ctx(cfg: PipelineConfig) -> tuple[RunPaths, Store]:
    return RunPaths(cfg.store, cfg.run), Store(cfg.store, cfg.s3_endpoint_url)


def resolve_pair(cfg: PipelineConfig, states: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The run's models and data: the config's, or the built-in demo pair (built once per store)."""
    paths, store = _ctx(cfg)
    pair_dir = None
    if cfg.uses_demo_pair:
        key = pr.demo_key(cfg.demo)
        ok = guarded(lambda: pr.demo_pair_ok(store, paths, cfg.demo))
        out = call_stage(pr.build_demo_pair_task, paths, ok, states, "demo_pair",
                         store_root=paths.store_root, demo=cfg.demo.model_dump(), key=key)
        pair_dir = pr.local_copy(store, out["url"], key)
    models, data = pr.resolved_models(cfg, pair_dir)
    return {"models": models, "data": data}


@flow(name="extract", log_prints=True)
def extract_flow(config: PipelineConfig) -> dict[str, Any]:
    """Stage 1: activation differences and per-token KL to Parquet shards, then the manifest."""
    return _extract(config, {})


def _extract(cfg: PipelineConfig, states: dict[str, dict[str, int]]) -> dict[str, Any]:
    from diffsae.models import model_fingerprint

    paths, store = _ctx(cfg)
    pair = resolve_pair(cfg, states)
    models, data = pair["models"], pair["data"]
    fps = (model_fingerprint(models.base, models.revision), model_fingerprint(models.finetuned, models.revision))
    plan = ex.plan_extraction(models, data.path, data.max_tokens_per_doc, data.max_docs, cfg.extract, fps)
    ctx = ex.ShardCtx(models.model_dump_json(), data.path, data.max_tokens_per_doc, data.max_docs,
                      cfg.extract.model_dump_json(), len(plan.shards))
    digests = []
    for spec in plan.shards:
        ok = guarded(lambda: ex.shard_ok(store, paths, spec, cfg.extract.verify))
        rec = call_stage(ex.extract_shard, paths, ok, states, "extract", store_root=paths.store_root, run=cfg.run,
                         spec=spec, ctx=ctx)
        digests.append(rec["sha256"])
    meta = {"data_path": data.path, "tokenizer": models.finetuned, "max_tokens": data.max_tokens_per_doc,
            "max_docs": data.max_docs, "layer": models.layer, "base": models.base, "finetuned": models.finetuned,
            "model_fingerprints": list(fps), "extract": cfg.extract.model_dump(), "tokens": plan.n_tokens}
    ok = guarded(lambda: ex.manifest_ok(store, paths, plan.data_key))
    out = call_stage(ex.commit_activations, paths, ok, states, "commit_activations", store_root=paths.store_root,
                     run=cfg.run, shard_keys=[s.key for s in plan.shards], shard_digests=digests,
                     plan_key=plan.data_key, meta=meta)
    return {**out, "models": models, "data": data}
