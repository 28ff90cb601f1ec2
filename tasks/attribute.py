"""Stage 3 task: encode + KL-attribute every analysed token (integrated gradients, diffsae/attribution.py).

Reads the documents' tokens from the activations stage on the store (never the prompts file) and writes the
analysis tables of storage/schemas.py: tokens (with kl_patch_base / kl_patch_bias / kl_patch_recon),
latent_tokens and latent_docs (parts), docs, latent_dirs (promoted / suppressed tokens) and metrics;
`analysis/attribution.json`, written last, is the stage's marker. Keyed on the SAE (key and weights), the
activations and the attribution settings that change the tables.
"""

from __future__ import annotations

import tempfile
import time
from typing import Mapping, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from tqdm import tqdm

from diffsae.attribution import Selection, attribute_batch, doc_seed, latent_doc_stats, promoted_suppressed
from diffsae.config import AttributionConfig, ModelsConfig
from diffsae.data import Doc
from diffsae.extract import pad_batch, plan_batches
from diffsae.models import ModelPair
from diffsae.sae import BatchTopKSAE
from storage import activations as act
from storage import schemas
from storage.context import RunContext
from tasks.common import IO_RETRY, STAGE_CACHE, read_marker, stage_key, write_marker
from tasks.extract import Activations, read_manifest
from tasks.models import MODEL_CACHE
from tasks.train import SAEResult

PART_ROWS = 2_000_000  # latent_tokens rows per Parquet part
NOISE_NATS = 1e-5  # a completeness gap below this is float noise: never worth refining
PATCH_COLUMNS = ("kl", "kl_patch_base", "kl_patch_bias", "kl_patch_recon", "attr_weight")


class AttributionResult(NamedTuple):
    """The attribution stage's summary (`analysis/attribution.json`)."""

    key: str
    parts: int
    tokens: int
    completeness_max_rel_error: float
    attribution_seconds: float


def attribution_key(cfg: AttributionConfig, sae: SAEResult, activations: Activations, skip_first: int) -> str:
    """What the attribution tables depend on: its settings, the SAE's actual weights, the activations."""
    settings = {**cfg.resolved(activations.rows).model_dump(exclude={"rank_by"}), "skip_first": skip_first}
    return stage_key("attribution", attribute, settings, sae.key, sae.weights_sha256, activations.fingerprint)


def attribution_done(ctx: RunContext, key: str) -> AttributionResult | None:
    return read_marker(ctx.store, ctx.paths.marker("attribution"), key, AttributionResult)


def load_sae(ctx: RunContext, device: object) -> BatchTopKSAE:
    with tempfile.TemporaryDirectory() as tmp:
        ctx.store.get_file(ctx.paths.url("sae", "sae.safetensors"), f"{tmp}/sae.safetensors")
        ctx.store.get_file(ctx.paths.url("sae", "cfg.json"), f"{tmp}/cfg.json")
        return BatchTopKSAE.load(tmp, device=device).eval()


def parts_table(rows: list[dict[str, np.ndarray]], schema: pa.Schema) -> pa.Table:
    """Concatenate column dicts (e.g. LatentDocStats._asdict() per batch) into a table of `schema`."""
    return pa.table(
        {f.name: pa.array(np.concatenate([c[f.name] for c in rows]) if rows else np.zeros(0), f.type) for f in schema},
        schema=schema,
    )


class _Parts:
    """Buffer latent_tokens rows and their per-(latent, document) aggregates (`latent_docs`, computed per batch of
    whole documents, so exact) and write both as numbered Parquet parts."""

    def __init__(self, ctx: RunContext) -> None:
        self.store, self.paths = ctx.store, ctx.paths
        self.cols: list[dict[str, np.ndarray]] = []
        self.docs: list[dict[str, np.ndarray]] = []
        self.n, self.parts = 0, 0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        self.cols.append(cols)
        stats = latent_doc_stats(cols["doc_id"], cols["latent_id"], cols["activation"], cols["kl_attribution"])
        self.docs.append(stats._asdict())
        self.n += len(cols["doc_id"])
        if self.n >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.cols and self.parts > 0:
            return
        for rows, schema, url in (
            (self.cols, schemas.LATENT_TOKENS, self.paths.latent_tokens_part(self.parts)),
            (self.docs, schemas.LATENT_DOCS, self.paths.latent_docs_part(self.parts)),
        ):
            self.store.write_parquet(url, parts_table(rows, schema), compression="zstd")
        self.parts += 1
        self.cols, self.docs, self.n = [], [], 0


class DocAttribution(NamedTuple):
    """One document's attribution: per-token KLs (PATCH_COLUMNS -> [n]), its records, its completeness."""

    doc: Doc
    per_token: dict[str, np.ndarray]
    records: dict[str, np.ndarray]  # pos, latent_id, activation, kl_attribution
    rel_error: float  # |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|
    steps: int


def attribute_docs(
    pair: ModelPair, layer: int, sae: BatchTopKSAE, docs: list[Doc], cfg: AttributionConfig, skip_first: int,
    steps: int, kls: Mapping[int, np.ndarray] | None = None,
) -> list[DocAttribution]:  # fmt: skip
    """Attribute one batch of whole documents; a document whose completeness misses `cfg.max_rel_error` (by more
    than float noise) is attributed again with twice the points, up to `cfg.max_steps`, keeping the better one.
    kls: extraction's per-token KL by doc_id (`act.read_doc_kls`): the base model then stops at `layer`."""
    if cfg.tokens not in ("all", "select"):
        raise ValueError(f"attribution.tokens {cfg.tokens!r} must be resolved first (AttributionConfig.resolved)")
    ids_BT, mask_BT = pad_batch(docs, pair.tokenizer.pad_token_id or 0, pair.device)
    select = None
    if cfg.tokens == "select":
        seeds = [doc_seed(cfg.select_seed, d.doc_id) for d in docs]
        select = Selection(cfg.select_top, cfg.select_sample, seeds)
    kl_BT = None
    if kls is not None:
        kl_BT = torch.zeros(ids_BT.shape, dtype=torch.float32)
        for b, d in enumerate(docs):
            kl_BT[b, : len(d.token_ids)] = torch.from_numpy(kls[d.doc_id])
    out = attribute_batch(
        pair.base, pair.finetuned, layer, ids_BT, mask_BT, sae, steps, skip_first, rule=cfg.rule, select=select,
        kl_BT=kl_BT,
    )  # fmt: skip
    drop_B, got_B = out.kl_drop_B.astype(np.float64), out.attr_sum_B.astype(np.float64)
    gap_B = np.abs(got_B - drop_B)
    rel_B = gap_B / np.maximum(np.abs(drop_B), 1e-6)
    per_token = (out.kl_BT, out.kl_patch_base_BT, out.kl_patch_bias_BT, out.kl_patch_recon_BT, out.weight_BT)
    result = []
    for b, d in enumerate(docs):
        n, sel = len(d.token_ids), out.batch_idx == b
        result.append(DocAttribution(
            d,
            {name: np.nan_to_num(arr[b, :n]).astype(np.float32) for name, arr in zip(PATCH_COLUMNS, per_token)},
            {"pos": out.pos[sel], "latent_id": out.latent_id[sel], "activation": out.activation[sel],
             "kl_attribution": out.attribution[sel]},
            float(rel_B[b]),
            steps,
        ))  # fmt: skip
    redo = [b for b in range(len(docs)) if rel_B[b] > cfg.max_rel_error and gap_B[b] > NOISE_NATS]
    if redo and 2 * steps <= cfg.max_steps:
        finer = attribute_docs(pair, layer, sae, [docs[b] for b in redo], cfg, skip_first, 2 * steps, kls)
        for b, f in zip(redo, finer):
            if f.rel_error < result[b].rel_error:
                result[b] = f
    return result


def attribute(
    ctx: RunContext,
    cfg: AttributionConfig,
    models: ModelsConfig,
    sae_result: SAEResult,
    activations: Activations,
    skip_first: int,
    batch_tokens: int,
    key: str,
) -> AttributionResult:
    """Integrated-gradients KL attribution over every document; writes the analysis tables."""
    done = attribution_done(ctx, key)
    if done is not None:
        return done
    cfg = cfg.resolved(activations.rows)
    read_manifest(ctx, activations)
    store, paths = ctx.store, ctx.paths
    pair = MODEL_CACHE.pair(ctx, models)
    sae = load_sae(ctx, pair.device)
    docs = act.read_docs(store, paths)
    kls = act.read_doc_kls(store, paths)
    store.delete_tree(paths.url("analysis"))  # no stale parts of an earlier SAE
    parts = _Parts(ctx)
    patch: dict[str, list[np.ndarray]] = {k: [] for k in ("doc_id", "pos", *PATCH_COLUMNS)}
    errors, refined, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=sum(len(d.token_ids) for d in docs), unit="tok", unit_scale=True, desc="KL attribution")
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        batch = attribute_docs(pair, models.layer, sae, [docs[i] for i in idx], cfg, skip_first, cfg.steps, kls)
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

    write_tokens(ctx, {k: np.concatenate(v) for k, v in patch.items()})
    store.write_parquet(paths.table("docs"), store.read_parquet(paths.table("activation_docs")))
    promoted, suppressed = promoted_suppressed(sae, pair.finetuned, pair.tokenizer, cfg.top_promoted)
    dirs = {"latent_id": np.arange(len(promoted), dtype=np.int32), "promoted": promoted, "suppressed": suppressed}
    store.write_parquet(paths.table("latent_dirs"), pa.table(dirs, schema=schemas.LATENT_DIRS))
    seconds, worst = time.perf_counter() - t0, max(errors, default=0.0)
    metrics = {k: float(v) for k, v in sae_result._asdict().items() if isinstance(v, (int, float))}
    metrics.update({
        "completeness_max_rel_error": worst,
        "completeness_median_rel_error": float(np.median(errors)) if errors else 0.0,
        "attribution_docs_refined": float(refined),
        "attribution_docs_over_tolerance": float(sum(e > cfg.max_rel_error for e in errors)),
        "attribution_steps": float(cfg.steps),
        "attribution_tokens_selected": float(cfg.tokens == "select"),
        "attribution_weighted_share": float(np.mean(np.concatenate(patch["attr_weight"]) > 0)) if errors else 0.0,
        "attribution_seconds": seconds,
    })  # fmt: skip
    table = pa.table({"name": list(metrics), "value": list(metrics.values())}, schema=schemas.METRICS)
    store.write_parquet(paths.table("metrics"), table)
    result = AttributionResult(key, parts.parts, sum(len(d.token_ids) for d in docs), worst, seconds)
    write_marker(store, paths.marker("attribution"), result)  # last: marks the stage complete
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


@task(name="attribute", cache_policy=STAGE_CACHE, **IO_RETRY)
def attribute_task(
    ctx: RunContext,
    cfg: AttributionConfig,
    models: ModelsConfig,
    sae: SAEResult,
    activations: Activations,
    skip_first: int,
    batch_tokens: int,
    key: str,
) -> AttributionResult:
    return attribute(ctx, cfg, models, sae, activations, skip_first, batch_tokens, key)
