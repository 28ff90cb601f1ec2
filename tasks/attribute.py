"""Stage 3 tasks: encode + KL-attribute every analysed token (integrated gradients, diffsae/attribution.py), one
cached task per attribution shard, then a commit task that writes the stage's marker last.

Why shards: as for extraction, a rerun after a kill recomputes only the shards without a sidecar, and
`extract.runner` (local, dask, ray) spreads them over a cluster. How: `plan_attribution` cuts the single-process
path's forward batches (`plan_batches` over every document, by `extract.batch_tokens`) into consecutive runs of
about `attribution.shard_tokens` tokens, so every document is attributed in the very batch the single-process path
uses and the tables do not depend on the layout, bit for bit (`shard_tokens` is in each shard's key, not in the
stage's). A shard reads its documents' tokens from the activations stage on the store (never the prompts file) and
writes, under names unique to its index and key (`<tag>`: 12 hex digits of the key):

    analysis/latent_tokens/shard-00003-<tag>-000.parquet   its latent_tokens rows (parts of PART_ROWS rows)
    analysis/latent_docs/shard-00003-<tag>-000.parquet     the same rows aggregated per (latent, document)
    analysis/attribution_shards/shard-00003-<tag>.parquet  per token: doc_id, pos and the patched-run KLs
    analysis/attribution_shards/shard-00003.json           sidecar (ShardRecord), written last: the shard is done

The commit checks every sidecar, deletes each part and shard file that no current sidecar lists (an earlier SAE,
settings or layout), writes the analysis tables of storage/schemas.py -- tokens (with kl_patch_base /
kl_patch_bias / kl_patch_recon), docs, latent_dirs (promoted / suppressed tokens), metrics -- and last
`analysis/attribution.json`, the stage's marker, which also lists the shard keys it vouches for. A shard that
computes first removes a marker that does not vouch for it, so no reader sees a marker over a mix of parts. The
later stages' outputs under analysis/ stay: their keys hold this stage's key, so their markers tell stale from
current. Keyed on the SAE (key and weights), the activations and the attribution settings that change the tables.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from prefect import task
from tqdm import tqdm

from diffsae.attribution import latent_doc_stats, promoted_suppressed
from diffsae.config import AttributionConfig, ModelsConfig
from diffsae.documents import PATCH_COLUMNS, attribute_docs, gradient_precision
from diffsae.extract import plan_batches
from diffsae.methods import load_dictionary
from storage import activations as act
from storage import schemas
from storage.context import RunContext
from storage.paths import RunPaths
from tasks.common import IO_RETRY, STAGE_CACHE, code_version, stable_hash, stage_key
from tasks.extract import Activations, read_manifest
from tasks.models import MODEL_CACHE
from tasks.train import SAEResult

PART_ROWS = 2_000_000  # latent_tokens rows per Parquet part
# A shard's per-token file, what the commit builds the tokens table's patched-run KLs from.
PATCH_SCHEMA = pa.schema(
    [pa.field("doc_id", pa.int64()), pa.field("pos", pa.int32())] + [pa.field(n, pa.float32()) for n in PATCH_COLUMNS]
)
SHARD_DIRS = ("latent_tokens", "latent_docs", "attribution_shards")  # under analysis/: what shards write


class AttributionResult(NamedTuple):
    """The attribution stage's summary (`analysis/attribution.json`)."""

    key: str
    parts: int
    tokens: int
    completeness_max_rel_error: float
    attribution_seconds: float


class AttributionShard(NamedTuple):
    """Consecutive forward batches of the single-process path (the doc ids of each batch, in batch order)."""

    index: int
    batches: list[list[int]]
    n_tokens: int
    key: str

    @property
    def tag(self) -> str:
        """What the shard's file names carry of its key."""
        return self.key.rsplit("-", 1)[-1][:12]


class ShardInputs(NamedTuple):
    """How to compute a shard (not part of its key: `AttributionShard.key` says what the output depends on)."""

    cfg: AttributionConfig
    models: ModelsConfig
    sae: SAEResult
    activations: Activations
    skip_first: int
    attribution_key: str  # the stage's key
    n_shards: int


class ShardRecord(NamedTuple):
    """An attribution shard's sidecar: its key, the files it wrote (relative to analysis/) and what the metrics
    need. Written last: the shard's completion marker."""

    index: int
    key: str
    parts: list[str]  # latent_tokens/..., latent_docs/...
    patch: str  # attribution_shards/...: per-token patched-run KLs (PATCH_SCHEMA)
    tokens: int
    rows: int  # latent_tokens rows
    rel_errors: list[float]  # per document: completeness |Σ attr − ΔKL| / |ΔKL|
    refined: int  # documents attributed again with more points
    seconds: float


def attribution_key(cfg: AttributionConfig, sae: SAEResult, activations: Activations, skip_first: int) -> str:
    """What the attribution tables depend on: its settings (`tokens: auto` resolved by the run's size), the SAE's
    actual weights, the activations, the code that writes them; not the shard layout (`shard_tokens`)."""
    resolved = cfg.resolved(activations.rows)
    settings = {**resolved.model_dump(exclude={"rank_by", "shard_tokens"}), "skip_first": skip_first}
    code = code_version(commit, attribute_docs)
    return stage_key("attribution", write_shard, settings, sae.key, sae.weights_sha256, activations.fingerprint, code)


def _marker(ctx: RunContext) -> dict[str, Any] | None:
    try:
        marker = ctx.store.read_json(ctx.paths.marker("attribution"))
    except Exception:  # noqa: BLE001 - missing or unreadable: vouches for nothing
        return None
    return marker if isinstance(marker, dict) else None


def attribution_done(ctx: RunContext, key: str, shard_keys: list[str] | None = None) -> AttributionResult | None:
    """The stage's result when its marker holds `key` (and vouches for exactly these shards, when given)."""
    marker = _marker(ctx)
    if marker is None or marker.get("key") != key:
        return None
    if shard_keys is not None and marker.get("shard_keys") != list(shard_keys):
        return None
    try:
        return AttributionResult(**{f: marker[f] for f in AttributionResult._fields})
    except KeyError:
        return None


def plan_attribution(ctx: RunContext, key: str, shard_tokens: int, batch_tokens: int) -> list[AttributionShard]:
    """The single-process path's forward batches (`plan_batches` over the activations stage's documents, in its
    document order) cut into consecutive runs: a shard ends with the batch that brings it to `shard_tokens`."""
    table = ctx.store.read_parquet(ctx.paths.table("activation_docs"), columns=["doc_id", "n_tokens"])
    ids, lengths = table["doc_id"].to_pylist(), table["n_tokens"].to_pylist()
    plan = plan_batches(lengths, batch_tokens)
    shards: list[AttributionShard] = []
    batches: list[list[int]] = []
    n = 0
    for j, idx in enumerate(plan):
        batches.append([ids[i] for i in idx])
        n += sum(lengths[i] for i in idx)
        if n >= shard_tokens or j == len(plan) - 1:
            h = stable_hash(key, shard_tokens, batch_tokens, len(shards), batches)
            shards.append(AttributionShard(len(shards), batches, n, f"attribution-shard-{h}"))
            batches, n = [], 0
    return shards


def read_sidecar(ctx: RunContext, index: int) -> ShardRecord | None:
    try:
        return ShardRecord(**ctx.store.read_json(ctx.paths.attribution_shard(index)))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def analysis_name(paths: RunPaths, url: str) -> str:
    """`url` relative to the run's analysis/ folder, as sidecars list their files."""
    return url[len(paths.url("analysis")) + 1 :]


def shard_files(ctx: RunContext) -> set[str]:
    """The files shards write (SHARD_DIRS), as `<dir>/<name>` relative to analysis/, one listing per folder."""
    return {f"{d}/{url.rsplit('/', 1)[-1]}" for d in SHARD_DIRS for url in ctx.store.ls(ctx.paths.url("analysis", d))}


def shard_done(ctx: RunContext, spec: AttributionShard, names: set[str] | None = None) -> ShardRecord | None:
    """The shard's sidecar when it holds the shard's key and every file it lists is on the store (`names`: the
    listing of `shard_files`, else one existence check per file)."""
    rec = read_sidecar(ctx, spec.index)
    if rec is None or rec.key != spec.key:
        return None
    files = {*rec.parts, rec.patch}
    if names is None:
        names = {f for f in files if ctx.store.exists(ctx.paths.url("analysis", f))}
    return rec if files <= names else None


def shards_done(ctx: RunContext, shards: list[AttributionShard]) -> list[bool]:
    names = shard_files(ctx)
    return [shard_done(ctx, spec, names) is not None for spec in shards]


def load_sae(ctx: RunContext, device: object) -> Any:
    """The run method's dictionary (`ctx.method`: a diff-SAE, a crosscoder seen in the diff space, or the ADL
    direction) as an SAELike (diffsae/methods.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx.store.get_file(ctx.paths.url("sae", "sae.safetensors"), f"{tmp}/sae.safetensors")
        ctx.store.get_file(ctx.paths.url("sae", "cfg.json"), f"{tmp}/cfg.json")
        return load_dictionary(tmp, device=device).eval()


def parts_table(rows: list[dict[str, np.ndarray]], schema: pa.Schema) -> pa.Table:
    """Concatenate column dicts (e.g. LatentDocStats._asdict() per batch) into a table of `schema`."""
    return pa.table(
        {f.name: pa.array(np.concatenate([c[f.name] for c in rows]) if rows else np.zeros(0), f.type) for f in schema},
        schema=schema,
    )


class _Parts:
    """Buffer a shard's latent_tokens rows and their per-(latent, document) aggregates (`latent_docs`, computed per
    batch of whole documents, so exact) and write both as the shard's numbered Parquet parts."""

    def __init__(self, ctx: RunContext, spec: AttributionShard) -> None:
        self.store, self.paths, self.spec = ctx.store, ctx.paths, spec
        self.cols: list[dict[str, np.ndarray]] = []
        self.docs: list[dict[str, np.ndarray]] = []
        self.n, self.rows = 0, 0
        self.files: list[str] = []  # relative to analysis/

    def add(self, cols: dict[str, np.ndarray]) -> None:
        self.cols.append(cols)
        stats = latent_doc_stats(cols["doc_id"], cols["latent_id"], cols["activation"], cols["kl_attribution"])
        self.docs.append(stats._asdict())
        self.n += len(cols["doc_id"])
        self.rows += len(cols["doc_id"])
        if self.n >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.cols and self.files:
            return
        part = len(self.files) // 2
        for rows, schema, table in ((self.cols, schemas.LATENT_TOKENS, "latent_tokens"),
                                    (self.docs, schemas.LATENT_DOCS, "latent_docs")):  # fmt: skip
            url = self.paths.attribution_part(table, self.spec.index, self.spec.tag, part)
            self.store.write_parquet(url, parts_table(rows, schema), compression="zstd")
            self.files.append(analysis_name(self.paths, url))
        self.cols, self.docs, self.n = [], [], 0


def release_marker(ctx: RunContext, key: str, shard_key: str) -> None:
    """Before a shard writes: remove the stage's marker unless it vouches for this very shard (same stage key, the
    shard in its layout: the shard rewrites its own files, same names, same content). Any other shard adds parts
    the marker does not cover."""
    marker = _marker(ctx)
    if marker is None or marker.get("key") != key or shard_key not in marker.get("shard_keys", []):
        ctx.store.delete(ctx.paths.marker("attribution"))


def write_shard(ctx: RunContext, spec: AttributionShard, inputs: ShardInputs) -> ShardRecord:
    """Integrated-gradients KL attribution of the shard's batches; writes its parts and patch file, then (last) its
    sidecar."""
    done = shard_done(ctx, spec)
    if done is not None:
        return done
    manifest = read_manifest(ctx, inputs.activations)
    release_marker(ctx, inputs.attribution_key, spec.key)
    cfg, models, store = inputs.cfg.resolved(inputs.activations.rows), inputs.models, ctx.store
    pair = MODEL_CACHE.pair(ctx, models)
    sae = MODEL_CACHE.sae(inputs.sae.key, inputs.sae.weights_sha256, pair.device, lambda: load_sae(ctx, pair.device))
    docs = MODEL_CACHE.run_docs(ctx, inputs.activations.fingerprint)
    kls = MODEL_CACHE.run_kls(ctx, inputs.activations.fingerprint)
    states = None  # extraction's stored unpatched runs (extract.save_states): both models then run patched only
    if act.has_states(store, ctx.paths, manifest):
        states = act.read_doc_states(store, ctx.paths, manifest, [i for ids in spec.batches for i in ids])
    parts = _Parts(ctx, spec)
    patch: dict[str, list[np.ndarray]] = {k: [] for k in PATCH_SCHEMA.names}
    errors, refined, t0 = [], 0, time.perf_counter()
    desc = f"KL attribution {spec.index + 1}/{inputs.n_shards}"
    bar = tqdm(total=spec.n_tokens, unit="tok", unit_scale=True, desc=desc)
    for ids in spec.batches:
        batch = attribute_docs(pair, models.layer, sae, [docs[i] for i in ids], cfg, inputs.skip_first, cfg.steps, kls,
                               states=states)  # fmt: skip
        recs = [r.records for r in batch]
        parts.add({
            "doc_id": np.concatenate([np.full(len(r["pos"]), a.doc.doc_id, np.int64) for r, a in zip(recs, batch)]),
            **{k: np.concatenate([r[k] for r in recs]) for k in ("pos", "latent_id", "activation", "kl_attribution")},
        })  # fmt: skip
        for a in batch:
            n = len(a.doc.token_ids)
            patch["doc_id"].append(np.full(n, a.doc.doc_id, np.int64))
            patch["pos"].append(np.arange(n, dtype=np.int32))
            for name in PATCH_COLUMNS:
                patch[name].append(a.per_token[name])
            errors.append(a.rel_error)
            refined += a.steps > cfg.steps
        bar.update(sum(len(a.doc.token_ids) for a in batch))
    bar.close()
    parts.flush()
    patch_table = pa.table({k: np.concatenate(v) for k, v in patch.items()}, schema=PATCH_SCHEMA)
    url = ctx.paths.attribution_shard(spec.index, spec.tag)
    store.write_parquet(url, patch_table, compression="zstd")
    seconds = time.perf_counter() - t0
    rec = ShardRecord(
        spec.index, spec.key, parts.files, analysis_name(ctx.paths, url), spec.n_tokens, parts.rows, errors, refined,
        seconds,
    )  # fmt: skip
    store.write_json(ctx.paths.attribution_shard(spec.index), rec._asdict())  # last: marks the shard complete
    return rec


@task(name="attribute-shard", cache_policy=STAGE_CACHE, **IO_RETRY, task_run_name="attribute-shard-{spec.index}")
def attribute_shard(ctx: RunContext, spec: AttributionShard, inputs: ShardInputs, key: str) -> ShardRecord:
    return write_shard(ctx, spec, inputs)


def commit_key(key: str, shard_keys: list[str]) -> str:
    """The commit task's cache key: the stage key and the shards it commits."""
    return f"{key}-{stable_hash(shard_keys)}"


def commit(ctx: RunContext, inputs: ShardInputs, shard_keys: list[str]) -> AttributionResult:
    """Check every shard's sidecar, delete the parts and shard files none lists, write the tokens, docs,
    latent_dirs and metrics tables, then the marker (last)."""
    key = inputs.attribution_key
    done = attribution_done(ctx, key, shard_keys)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    names = shard_files(ctx)
    records = []
    for i, shard_key in enumerate(shard_keys):
        rec = read_sidecar(ctx, i)
        if rec is None or rec.key != shard_key or not {*rec.parts, rec.patch} <= names:
            raise RuntimeError(f"attribution shard {i} is missing or does not match its key: rerun the analysis")
        records.append(rec)
    store.delete(paths.marker("attribution"))  # an earlier marker must not vouch for what follows
    sidecars = {analysis_name(paths, paths.attribution_shard(r.index)) for r in records}
    keep = {f for r in records for f in (*r.parts, r.patch)} | sidecars
    for name in sorted(names - keep):  # parts of earlier SAEs, settings or layouts; unfinished uploads
        store.delete(paths.url("analysis", name))

    patch = pa.concat_tables([store.read_parquet(paths.url("analysis", r.patch)) for r in records])
    write_tokens(ctx, {name: patch[name].to_numpy() for name in PATCH_SCHEMA.names})
    store.write_parquet(paths.table("docs"), store.read_parquet(paths.table("activation_docs")))
    pair = MODEL_CACHE.pair(ctx, inputs.models)
    sae = MODEL_CACHE.sae(inputs.sae.key, inputs.sae.weights_sha256, pair.device, lambda: load_sae(ctx, pair.device))
    cfg = inputs.cfg.resolved(inputs.activations.rows)
    promoted, suppressed = promoted_suppressed(sae, pair.finetuned, pair.tokenizer, cfg.top_promoted)
    dirs = {"latent_id": np.arange(len(promoted), dtype=np.int32), "promoted": promoted, "suppressed": suppressed}
    store.write_parquet(paths.table("latent_dirs"), pa.table(dirs, schema=schemas.LATENT_DIRS))
    errors = [e for r in records for e in r.rel_errors]
    seconds, worst = sum(r.seconds for r in records), max(errors, default=0.0)
    metrics = {k: float(v) for k, v in inputs.sae._asdict().items() if isinstance(v, (int, float))}
    metrics.update({
        "completeness_max_rel_error": worst,
        "completeness_median_rel_error": float(np.median(errors)) if errors else 0.0,
        "attribution_docs_refined": float(sum(r.refined for r in records)),
        "attribution_docs_over_tolerance": float(sum(e > cfg.max_rel_error for e in errors)),
        "attribution_steps": float(cfg.steps),
        "attribution_tokens_selected": float(cfg.tokens == "select"),
        "attribution_bfloat16": float(gradient_precision(cfg, pair.device) == "bfloat16"),  # this machine's
        "attribution_weighted_share": float(np.mean(patch["attr_weight"].to_numpy() > 0)) if patch.num_rows else 0.0,
        "attribution_seconds": seconds,
    })  # fmt: skip
    table = pa.table({"name": list(metrics), "value": list(metrics.values())}, schema=schemas.METRICS)
    store.write_parquet(paths.table("metrics"), table)
    n_parts = sum(f.startswith("latent_tokens/") for r in records for f in r.parts)
    result = AttributionResult(key, n_parts, sum(r.tokens for r in records), worst, seconds)
    store.write_json(paths.marker("attribution"), {**result._asdict(), "shard_keys": list(shard_keys)})  # last
    return result


def write_tokens(ctx: RunContext, patch: dict[str, np.ndarray]) -> None:
    """analysis/tokens: the activations stage's tokens table joined with the per-token patched-run KLs."""
    tokens = ctx.store.read_parquet(ctx.paths.table("activation_tokens"))
    key_N = tokens["doc_id"].to_numpy().astype(np.int64) * (1 << 32) + tokens["pos"].to_numpy()
    order = np.argsort(patch["doc_id"] * (1 << 32) + patch["pos"], kind="stable")
    at = order[np.searchsorted((patch["doc_id"] * (1 << 32) + patch["pos"])[order], key_N)]
    cols = {f.name: tokens[f.name] for f in schemas.TOKENS if f.name != "kl"}
    cols.update({name: pa.array(patch[name][at], schemas.ANALYSIS_TOKENS.field(name).type) for name in PATCH_COLUMNS})
    table = pa.table({f.name: cols[f.name] for f in schemas.ANALYSIS_TOKENS}, schema=schemas.ANALYSIS_TOKENS)
    ctx.store.write_parquet(ctx.paths.table("tokens"), table, compression="zstd")


@task(name="commit-attribution", cache_policy=STAGE_CACHE, **IO_RETRY)
def commit_attribution(ctx: RunContext, inputs: ShardInputs, shard_keys: list[str], key: str) -> AttributionResult:
    return commit(ctx, inputs, shard_keys)
