"""Stage flows: each stage of the pipeline as a flow of its own (a deployment entry point and a subflow of
`pipeline`). They hold the DAG only: which tasks run, in which order, on whose outputs; tasks do the work.

Every stage computes its key from its config section and its upstream results, asks the store whether its marker
holds that key, and calls its task (Prefect's cache key = that key) -- forced to recompute when the marker does not.
One `RunContext` (store, endpoint, run name) is built from the config and handed to every task.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

from prefect import flow

from diffsae.config import DataConfig, ExtractConfig, ModelsConfig, PipelineConfig
from diffsae.models import model_fingerprint
from flows.runners import on_cluster
from storage.context import RunContext
from storage.lock import RunLock
from storage.paths import DEFAULT_METHOD
from tasks import attribute as at
from tasks import compare as cp
from tasks import dashboards as db
from tasks import extract as ex
from tasks import methods as mt
from tasks import pair as pr
from tasks import rank as rk
from tasks import train as tr
from tasks import validate as vl
from tasks.common import call_stage, collect_stage, submit_stage
from tasks.models import local_models

States = dict[str, dict[str, int]]

# Extract settings that say where shards run, not what they hold: kept out of the manifest (and its key).
EXECUTION_ONLY = {"runner", "cluster_address", "n_workers", "verify"}


class Inputs(NamedTuple):
    """The run's resolved models and data (the config's, or the demo pair's by store URL)."""

    models: ModelsConfig
    data: DataConfig  # `path` is the prompts' URL on the store


class Analysis(NamedTuple):
    attribution: at.AttributionResult
    ranking: rk.RankingResult


class MethodResult(NamedTuple):
    """Stages 2-6 of one method, each under the method's prefix (storage/paths.py)."""

    sae: tr.SAEResult
    analysis: Analysis
    validation: vl.ValidationResult
    dashboards: db.SiteResult
    seconds: float  # wall time of the method's stages in this flow run (cached stages cost ~0)


@contextmanager
def locked(cfg: PipelineConfig) -> Iterator[RunContext]:
    """Hold the run's lock on the store for the whole flow (same-name runs never interleave); yields the context."""
    ctx = RunContext.from_config(cfg)
    with RunLock(ctx.store, ctx.paths, wait=cfg.lock_wait_s):
        yield ctx


def resolve_inputs(ctx: RunContext, cfg: PipelineConfig, states: States) -> Inputs:
    """The built-in demo pair (built once per store) or the config's pair; the prompts uploaded to the store."""
    pair = None
    if cfg.uses_demo_pair:
        key = pr.demo_key(cfg.demo)
        pair = call_stage(
            pr.build_demo_pair_task,
            ctx,
            pr.demo_pair_done(ctx, key) is not None,
            states,
            "demo_pair",
            results_url=ctx.paths.cache_dir(".prefect"),  # the pair is store-wide: so are its cache records
            demo=cfg.demo,
            key=key,
        )
    models, data = pr.resolved_inputs(cfg, pair)
    return Inputs(models, data.model_copy(update={"path": ex.upload_data(ctx, data.path)}))


@flow(name="extract", log_prints=True)
def extract_flow(config: PipelineConfig) -> tuple[ex.Activations, States]:
    """Stage 1: activation differences and per-token KL to Parquet shards, then the manifest."""
    states: States = {}
    with locked(config) as ctx:
        return run_extract(ctx, config, resolve_inputs(ctx, config, states), states), states


def run_extract(ctx: RunContext, cfg: PipelineConfig, inputs: Inputs, states: States) -> ex.Activations:
    models, data = inputs
    local = local_models(ctx, models)
    assert local.base is not None and local.finetuned is not None
    fps = (model_fingerprint(local.base, models.revision), model_fingerprint(local.finetuned, models.revision))
    plan = ex.plan_extraction(ctx, models, data, cfg.extract, fps)
    shard_inputs = ex.ShardInputs(models=models, data=data, extract=cfg.extract, n_shards=len(plan.shards))
    done = [ex.shard_done(ctx, spec, cfg.extract.verify) is not None for spec in plan.shards]
    calls = [(ok, {"spec": spec, "inputs": shard_inputs, "key": spec.key}) for spec, ok in zip(plan.shards, done)]
    records = run_shards(ctx, cfg.extract, ex.extract_shard, calls, states, "extract")
    meta = {  # store locations as `<store>/...`: the same content keys the same on any store
        "data": {**data.model_dump(), "path": ctx.portable(data.path)},
        "layer": models.layer,
        "base": ctx.portable(models.base),
        "finetuned": ctx.portable(models.finetuned),
        "model_fingerprints": list(fps),
        "extract": cfg.extract.model_dump(exclude=EXECUTION_ONLY),
        "tokens": plan.n_tokens,
    }
    digests = [r.sha256 for r in records]
    key = ex.activations_key(plan, digests, meta)
    return call_stage(
        ex.commit_activations,
        ctx,
        ex.activations_done(ctx, key) is not None,
        states,
        "commit_activations",
        inputs=shard_inputs,
        shard_keys=[s.key for s in plan.shards],
        digests=digests,
        meta=meta,
        key=key,
    )


def run_shards(
    ctx: RunContext, extract: ExtractConfig, task: Any, calls: list[tuple[bool, dict[str, Any]]], states: States,
    name: str,
) -> list[Any]:  # fmt: skip
    """Shard tasks (extraction's, attribution's), each `(done, kwargs)`, in shard order: in the flow for
    `extract.runner: local`, else in parallel on its Dask or Ray cluster. Same cache semantics either way: a shard
    whose output is not in place is recomputed."""
    if extract.runner == "local":
        return [call_stage(task, ctx, done, states, name, **kwargs) for done, kwargs in calls]
    with on_cluster(extract) as runner:
        futures = [submit_stage(runner, task, ctx, done, **kwargs) for done, kwargs in calls]
        for future in futures:  # every shard finishes (kept for a resume) before the first failure is raised
            future.wait()
        return [collect_stage(future, states, name) for future in futures]


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig) -> tuple[tr.SAEResult, States]:
    """Stage 2: the BatchTopK diff-SAE on the stored activations (extraction runs first if needed)."""
    states: States = {}
    with locked(config) as ctx:
        inputs = resolve_inputs(ctx, config, states)
        return run_train(ctx, config, inputs, run_extract(ctx, config, inputs, states), states), states


def run_train(
    ctx: RunContext, cfg: PipelineConfig, inputs: Inputs, activations: ex.Activations, states: States
) -> tr.SAEResult:
    """Stage 2 for `ctx.method`: the diff-SAE, the crosscoder or the ADL direction (tasks/methods.py)."""
    if ctx.method == "crosscoder":
        key = mt.crosscoder_key(cfg.sae, activations, cfg.extract.skip_first)
        return call_stage(
            mt.train_crosscoder_task, ctx, tr.sae_done(ctx, key) is not None, states, "train", cfg=cfg.sae,
            activations=activations, models=inputs.models, batch_tokens=cfg.extract.batch_tokens,
            skip_first=cfg.extract.skip_first, key=key,
        )  # fmt: skip
    if ctx.method == "adl":
        key = mt.adl_key(cfg.adl, cfg.sae, activations)
        return call_stage(
            mt.fit_adl_task, ctx, tr.sae_done(ctx, key) is not None, states, "train", cfg=cfg.adl, sae_cfg=cfg.sae,
            activations=activations, models=inputs.models, key=key,
        )  # fmt: skip
    key = tr.sae_key(cfg.sae, activations)
    done = tr.sae_done(ctx, key) is not None
    return call_stage(
        tr.train_sae_task, ctx, done, states, "train", cfg=cfg.sae, activations=activations, models=inputs.models,
        key=key,
    )  # fmt: skip


@flow(name="analyse", log_prints=True)
def analyse_flow(config: PipelineConfig) -> tuple[Analysis, States]:
    """Stages 3-4: KL attribution of every analysed token, then the latent ranking (upstream stages if needed)."""
    states: States = {}
    with locked(config) as ctx:
        inputs = resolve_inputs(ctx, config, states)
        activations = run_extract(ctx, config, inputs, states)
        sae = run_train(ctx, config, inputs, activations, states)
        return run_analyse(ctx, config, inputs, activations, sae, states), states


def run_analyse(
    ctx: RunContext,
    cfg: PipelineConfig,
    inputs: Inputs,
    activations: ex.Activations,
    sae: tr.SAEResult,
    states: States,
) -> Analysis:
    akey = at.attribution_key(cfg.attribution, sae, activations, cfg.extract.skip_first)
    attribution = run_attribution(ctx, cfg, inputs, activations, sae, akey, states)
    rkey = rk.rank_key(cfg.attribution.rank_by, cfg.rank, akey)
    done = rk.rank_done(ctx, rkey) is not None
    ranking = call_stage(
        rk.rank_task, ctx, done, states, "rank", rank_by=cfg.attribution.rank_by, cfg=cfg.rank,
        skip_first=cfg.extract.skip_first, attribution_key=akey, key=rkey,
    )  # fmt: skip
    return Analysis(attribution, ranking)


def run_attribution(
    ctx: RunContext,
    cfg: PipelineConfig,
    inputs: Inputs,
    activations: ex.Activations,
    sae: tr.SAEResult,
    key: str,
    states: States,
) -> at.AttributionResult:
    """Stage 3: one task per attribution shard ("attribute", on `extract.runner` like extraction), then the commit
    that writes the tables and the marker."""
    plan = at.plan_attribution(ctx, key, cfg.attribution.shard_tokens, cfg.extract.batch_tokens)
    shard_inputs = at.ShardInputs(
        cfg=cfg.attribution.resolved(activations.rows), models=inputs.models, sae=sae, activations=activations,
        skip_first=cfg.extract.skip_first, attribution_key=key, n_shards=len(plan),
    )  # fmt: skip
    done = at.shards_done(ctx, plan)
    calls = [(ok, {"spec": spec, "inputs": shard_inputs, "key": spec.key}) for spec, ok in zip(plan, done)]
    run_shards(ctx, cfg.extract, at.attribute_shard, calls, states, "attribute")
    shard_keys = [spec.key for spec in plan]
    return call_stage(
        at.commit_attribution, ctx, at.attribution_done(ctx, key, shard_keys) is not None, states,
        "commit_attribution", inputs=shard_inputs, shard_keys=shard_keys, key=at.commit_key(key, shard_keys),
    )  # fmt: skip


def run_validate(
    ctx: RunContext, cfg: PipelineConfig, inputs: Inputs, analysis: Analysis, states: States
) -> vl.ValidationResult:
    """Stage 5: ablate the top latents from the finetuned model and steer the base with them (`validation.top`
    latents; 0 skips the work, the marker still records it)."""
    key = vl.validation_key(cfg.validation, analysis.ranking.key)
    done = vl.validation_done(ctx, key) is not None
    return call_stage(
        vl.validate_task, ctx, done, states, "validate", cfg=cfg.validation, models=inputs.models,
        skip_first=cfg.extract.skip_first, batch_tokens=cfg.extract.batch_tokens, rank_key=analysis.ranking.key,
        key=key,
    )  # fmt: skip


@flow(name="dashboards", log_prints=True)
def dashboards_flow(config: PipelineConfig) -> tuple[db.SiteResult, States]:
    """Stage 6: the static KL dashboards (upstream stages, validation included, run first if needed)."""
    states: States = {}
    with locked(config) as ctx:
        inputs = resolve_inputs(ctx, config, states)
        activations = run_extract(ctx, config, inputs, states)
        sae = run_train(ctx, config, inputs, activations, states)
        analysis = run_analyse(ctx, config, inputs, activations, sae, states)
        validation = run_validate(ctx, config, inputs, analysis, states)
        return run_dashboards(ctx, config, analysis, validation, states), states


def run_dashboards(
    ctx: RunContext, cfg: PipelineConfig, analysis: Analysis, validation: vl.ValidationResult, states: States
) -> db.SiteResult:
    key = db.site_key(cfg.dashboards, analysis.ranking.key, validation.key)
    done = db.site_done(ctx, key) is not None
    return call_stage(
        db.dashboards_task, ctx, done, states, "dashboards", cfg=cfg.dashboards, rank_key=analysis.ranking.key,
        validation_key=validation.key, key=key,
    )  # fmt: skip



def run_method(
    ctx: RunContext, cfg: PipelineConfig, inputs: Inputs, activations: ex.Activations, states: States
) -> MethodResult:
    """Stages 2-6 for `ctx.method` on the shared activations. Its stages are counted in `states` under their own
    names for the default method and as `<method>:<stage>` for the others."""
    own: States = {}
    t0 = time.perf_counter()
    sae = run_train(ctx, cfg, inputs, activations, own)
    analysis = run_analyse(ctx, cfg, inputs, activations, sae, own)
    validation = run_validate(ctx, cfg, inputs, analysis, own)
    site = run_dashboards(ctx, cfg, analysis, validation, own)
    prefix = "" if ctx.method == DEFAULT_METHOD else f"{ctx.method}:"
    states.update({prefix + name: counts for name, counts in own.items()})
    return MethodResult(sae, analysis, validation, site, time.perf_counter() - t0)


def run_compare(ctx: RunContext, results: dict[str, MethodResult], states: States) -> cp.CompareResult:
    """The methods side by side (`methods` table, methods/index.html); only for runs of more than one method."""
    pairs = {m: (r.sae, r.analysis.ranking) for m, r in results.items()}
    key = cp.compare_key(pairs)
    done = cp.compare_done(ctx, key) is not None
    return call_stage(cp.compare_task, ctx, done, states, "compare", results=pairs, key=key)
