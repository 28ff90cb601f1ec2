"""Stages 3-4 tasks: encode + KL-attribute every analysed token, then rank latents with DuckDB SQL.

`attribute_task` (cached on the SAE, the activations and `attribution.steps`) writes the analysis tables:
tokens (with kl_patch_base / kl_patch_bias / kl_patch_recon), latent_tokens and latent_docs (parts), docs, latent_dirs
(promoted / suppressed tokens) and metrics. `rank_task` (cached on those + rank_by) runs the SQL in
storage/sql/ to produce `latents` and, when the data has behaviour labels, `recovery`.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task
from tqdm import tqdm

from diffsae.config import AttributionConfig, ModelsConfig
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, STAGE_CACHE

PART_ROWS = 2_000_000  # latent_tokens rows per Parquet part


def load_sae(store: Store, paths: RunPaths, device: Any) -> Any:
    from diffsae.sae import BatchTopKSAE

    with tempfile.TemporaryDirectory() as tmp:
        store.get_file(paths.url("sae", "sae.safetensors"), f"{tmp}/sae.safetensors")
        store.get_file(paths.url("sae", "cfg.json"), f"{tmp}/cfg.json")
        return BatchTopKSAE.load(tmp, device=device).eval()


def analysis_ok(store: Store, paths: RunPaths, key: str) -> bool:
    try:
        return store.read_json(paths.url("analysis", "attribution.json")).get("key") == key
    except (FileNotFoundError, ValueError):
        return False


LT_TYPES = {
    "doc_id": pa.int64(), "pos": pa.int32(), "latent_id": pa.int32(), "activation": pa.float32(),
    "kl_attribution": pa.float32(),
}  # fmt: skip
LD_TYPES = {
    "latent_id": pa.int32(), "doc_id": pa.int64(), "n_tokens": pa.int32(), "act_sum": pa.float64(),
    "act_max": pa.float32(), "attr_sum": pa.float64(), "attr_max": pa.float32(),
}  # fmt: skip


def parts_table(rows: list[dict[str, np.ndarray]], types: dict[str, pa.DataType]) -> pa.Table:
    """Concatenate column dicts (e.g. LatentDocStats._asdict() per batch) into a table with `types`' schema."""
    return pa.table({
        k: pa.array(np.concatenate([c[k] for c in rows]) if rows else np.zeros(0), t) for k, t in types.items()
    })  # fmt: skip


class _Parts:
    """Buffer latent_tokens rows and their per-(latent, document) aggregates (`latent_docs`, computed per batch of
    whole documents, so exact) and write both as numbered Parquet parts."""

    def __init__(self, store: Store, paths: RunPaths) -> None:
        self.store, self.paths = store, paths
        self.cols: list[dict[str, np.ndarray]] = []
        self.docs: list[dict[str, np.ndarray]] = []
        self.n, self.parts = 0, 0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        from diffsae.attribution import latent_doc_stats

        self.cols.append(cols)
        stats = latent_doc_stats(cols["doc_id"], cols["latent_id"], cols["activation"], cols["kl_attribution"])
        self.docs.append(stats._asdict())
        self.n += len(cols["doc_id"])
        if self.n >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.cols and self.parts > 0:
            return
        for rows, types, url in (
            (self.cols, LT_TYPES, self.paths.latent_tokens_part(self.parts)),
            (self.docs, LD_TYPES, self.paths.latent_docs_part(self.parts)),
        ):
            self.store.write_parquet(url, parts_table(rows, types), compression="zstd")
        self.parts += 1
        self.cols, self.docs, self.n = [], [], 0


@task(name="attribute", cache_policy=STAGE_CACHE, **IO_RETRY)
def attribute_task(
    store_root: str,
    run: str,
    steps: int,
    top_promoted: int,
    sae_key: str,
    manifest_fingerprint: str,
    models: dict[str, Any],
    skip_first: int,
    batch_tokens: int,
    key: str,
) -> dict[str, Any]:
    """Integrated-gradients KL attribution over every document; writes the analysis tables."""
    from diffsae.attribution import attribute_batch, promoted_suppressed
    from diffsae.extract import pad_batch, plan_batches
    from tasks.extract import _docs, _pair, _token_strings

    paths, store = RunPaths(store_root, run), Store(store_root)
    manifest = act.read_manifest(store, paths)
    if manifest is None or manifest["fingerprint"] != manifest_fingerprint:
        raise RuntimeError("activation manifest missing or changed: rerun extraction")
    models_cfg = ModelsConfig.model_validate(models)
    pair = _pair(models_cfg.model_dump_json())
    sae = load_sae(store, paths, pair.device)
    docs = _docs(manifest["data_path"], manifest["tokenizer"], manifest["max_tokens"], manifest["max_docs"])
    strings = _token_strings(manifest["tokenizer"])
    store.delete_tree(paths.url("analysis"))  # no stale parts of an earlier SAE
    parts = _Parts(store, paths)
    tok_cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("doc_id", "pos", "token_id", "kl", "kl_patch_base", "kl_patch_bias", "kl_patch_recon")
    }
    roles: list[str] = []
    worst, t0 = 0.0, time.perf_counter()
    n_tokens = sum(len(d.token_ids) for d in docs)
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="KL attribution")
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        bdocs = [docs[i] for i in idx]
        ids_BT, mask_BT = pad_batch(bdocs, pair.tokenizer.pad_token_id or 0, pair.device)
        out = attribute_batch(
            pair.base, pair.finetuned, models_cfg.layer, ids_BT, mask_BT, sae, steps, skip_first
        )
        doc_ids = np.array([d.doc_id for d in bdocs], np.int64)
        parts.add(
            {
                "doc_id": doc_ids[out.batch_idx],
                "pos": out.pos,
                "latent_id": out.latent_id,
                "activation": out.activation,
                "kl_attribution": out.attribution,
            }
        )
        for b, d in enumerate(bdocs):
            n = len(d.token_ids)
            tok_cols["doc_id"].append(np.full(n, d.doc_id, np.int64))
            tok_cols["pos"].append(np.arange(n, dtype=np.int32))
            tok_cols["token_id"].append(np.asarray(d.token_ids, np.int32))
            for name, arr in (
                ("kl", out.kl_BT),
                ("kl_patch_base", out.kl_patch_base_BT),
                ("kl_patch_bias", out.kl_patch_bias_BT),
                ("kl_patch_recon", out.kl_patch_recon_BT),
            ):
                tok_cols[name].append(np.nan_to_num(arr[b, :n]).astype(np.float32))
            roles.extend(d.roles)
        drop, got = out.kl_drop_B.astype(np.float64), out.attr_sum_B.astype(np.float64)
        rel = np.abs(got - drop) / np.maximum(np.abs(drop), 1e-6)
        worst = max(worst, float(rel.max(initial=0.0)))
        bar.update(int(mask_BT.sum()))
    bar.close()
    parts.flush()

    merged = {k: np.concatenate(v) for k, v in tok_cols.items()}
    tokens = pa.table(
        {
            "doc_id": pa.array(merged["doc_id"], pa.int64()),
            "pos": pa.array(merged["pos"], pa.int32()),
            "token_id": pa.array(merged["token_id"], pa.int32()),
            "token": pa.array([strings[t] for t in merged["token_id"].tolist()], pa.string()),
            "role": pa.array(roles, pa.string()),
            **{
                k: pa.array(merged[k], pa.float32())
                for k in ("kl", "kl_patch_base", "kl_patch_bias", "kl_patch_recon")
            },
        }
    )
    store.write_parquet(paths.table("tokens"), tokens, compression="zstd")
    store.write_parquet(paths.table("docs"), store.read_parquet(paths.url("activations", "docs.parquet")))
    promoted, suppressed = promoted_suppressed(sae, pair.finetuned, pair.tokenizer, top_promoted)
    dirs = pa.table(
        {
            "latent_id": pa.array(np.arange(len(promoted)), pa.int32()),
            "promoted": pa.array(promoted, pa.list_(pa.string())),
            "suppressed": pa.array(suppressed, pa.list_(pa.string())),
        }
    )
    store.write_parquet(paths.url("analysis", "latent_dirs.parquet"), dirs)
    sae_metrics = store.read_json(paths.url("sae", "metrics.json"))
    metrics = {k: float(v) for k, v in sae_metrics.items() if isinstance(v, (int, float))}
    metrics.update(
        {
            "completeness_max_rel_error": worst,
            "attribution_steps": float(steps),
            "attribution_seconds": time.perf_counter() - t0,
        }
    )
    store.write_parquet(
        paths.table("metrics"), pa.table({"name": list(metrics), "value": list(metrics.values())})
    )
    summary = {"key": key, "parts": parts.parts, "tokens": tokens.num_rows, **metrics}
    store.write_json(paths.url("analysis", "attribution.json"), summary)  # last: marks the stage complete
    return summary


def attribution_key(cfg: AttributionConfig, sae: dict[str, Any], manifest_fingerprint: str) -> dict[str, Any]:
    """What the attribution tables depend on: its settings, the SAE's actual weights, the activations."""
    return {
        "steps": cfg.steps,
        "top_promoted": cfg.top_promoted,
        "sae": sae["key"],
        "sae_weights": sae.get("weights_sha256"),
        "manifest": manifest_fingerprint,
    }


def rank_ok(store: Store, paths: RunPaths, key: str) -> bool:
    try:
        return store.read_json(paths.url("analysis", "ranking.json")).get("key") == key
    except (FileNotFoundError, ValueError):
        return False


@task(name="rank", cache_policy=STAGE_CACHE, **IO_RETRY)
def rank_task(
    store_root: str, run: str, rank_by: str, skip_first: int, attribution_key: str, key: str
) -> dict[str, Any]:
    """DuckDB SQL (storage/sql/) over the analysis tables -> `latents` and, with behaviour labels, `recovery`."""
    from storage import duck, ranking

    paths, store = RunPaths(store_root, run), Store(store_root)
    con = duck.connect(store_root, run)
    dirs = store.read_parquet(paths.url("analysis", "latent_dirs.parquet"))
    analysed = con.execute(f"SELECT count(*) FROM tokens WHERE pos >= {int(skip_first)}").fetchone()[0]
    latents = ranking.rank_latents(con, rank_by, latent_dirs=dirs, n_tokens=int(analysed))
    rec = ranking.recovery(con, latents)
    store.write_parquet(paths.table("latents"), latents)
    publish_recovery(store, paths, rec)
    top = (
        latents.slice(0, 10)
        .select(
            ["rank", "latent_id", "kl_attr_sum"]
            + (["dominant_behaviour"] if "dominant_behaviour" in latents.column_names else [])
        )
        .to_pylist()
    )
    out = {
        "key": key,
        "n_latents": latents.num_rows,
        "top": top,
        "recovery": rec.to_pylist(),
        "recovery_text": ranking.format_recovery(rec),
    }
    store.write_json(paths.url("analysis", "ranking.json"), out)  # last: marks the stage complete
    return out


def publish_recovery(store: Store, paths: RunPaths, rec: pa.Table) -> None:
    """Write the `recovery` table and log it to the SAE's MLflow run (when the data has behaviour labels)."""
    if not rec.num_rows:
        store.delete(paths.table("recovery"))
        return
    store.write_parquet(paths.table("recovery"), rec)
    try:
        run_id = store.read_json(paths.url("sae", "metrics.json")).get("mlflow_run_id")
    except FileNotFoundError:
        run_id = None
    if not run_id:
        return
    import mlflow

    from storage.mlflow_setup import experiment

    experiment(paths)
    metrics: dict[str, float] = {}
    for r in rec.to_pylist():
        metrics[f"recovery.{r['score']}.{r['behaviour']}.best_rank"] = float(r["best_rank"] or -1)
        metrics[f"recovery.{r['score']}.top10_capture_fraction"] = float(r["top10_capture_fraction"] or 0.0)
    for score in {r["score"] for r in rec.to_pylist()}:
        rows = [r for r in rec.to_pylist() if r["score"] == score]
        metrics[f"recovery.{score}.recovered_fraction"] = sum(bool(r["recovered"]) for r in rows) / len(rows)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)


def evaluate_run(store_root: str, run: str) -> str:
    """`diffsae eval`: recovery of the planted behaviours for every score, from the run's tables (no recompute)."""
    from storage import duck, ranking

    paths, store = RunPaths(store_root, run), Store(store_root)
    con = duck.connect(store_root, run)
    if "latents" not in duck.view_names(con):
        raise FileNotFoundError(f"run '{run}' has no latents table on {store_root}: run the pipeline first")
    rec = ranking.recovery(con)
    publish_recovery(store, paths, rec)
    return ranking.format_recovery(rec)
