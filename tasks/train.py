"""Stage 2 task: train the BatchTopK diff-SAE on the activation shards, tracked in MLflow.

Keyed on (SAE config, activation manifest fingerprint, this stage's source): changing `sae.k` retrains, rerunning
unchanged does not. Data streams from the shards on the store through a shuffle buffer that mixes shards; the
train/calibration/validation split is by document. After training, the inference threshold is calibrated on the
calibration documents, which the SAE never trained on (mean L0 = k there; `diffsae.train.calibrate_threshold`): an
SAE trained for many passes over a small analysis set separates its training tokens' pre-activations and leaves
many mid-range ones on new tokens (SmolLM2 organism, 100 documents, 266 passes, k = 32: a threshold calibrated on
the training tokens gives L0 32.0 there and 49.6 on the validation documents; calibrated on 11 held-out documents,
27.3 and 28.1). That 28.1 is one draw: the L0 of ~10 documents depends on which documents they are (per-document
L0 13-70 there), so `l0_crossfit` also measures the calibration on every held-out (calibration + validation)
document, each half with the threshold calibrated on the other (`diffsae.train.crossfit_l0`; bench/l0_calibration.py
shows the spread of single splits). Final validation metrics: FVU, L0, dead fraction and
kl_gap_recovered = 1 − Σ KL(p_ft ‖ p_patch(h_base + d̂)) / Σ KL(p_ft ‖ p_patch(h_base)) over the validation
tokens (forward passes only, on the tokens the activations stage stored).
`sae/metrics.json`, written last, is the stage's marker.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any, Iterator, NamedTuple

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from prefect import task

from diffsae.config import ModelsConfig, SAEConfig
from diffsae.patching import kl_gap_recovered
from diffsae.shuffle import shuffled_batches
from diffsae.split import split_calibration, split_docs
from diffsae.train import calibrate_threshold, crossfit_l0, evaluate, train_sae
from storage import activations as act
from storage.context import RunContext
from storage.mlflow_setup import flat_params
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, STAGE_CACHE, read_marker, stage_key, write_marker
from tasks.extract import Activations, read_manifest
from tasks.models import MODEL_CACHE

SAE_FILES = ("sae.safetensors", "cfg.json", "metrics.json")
KL_GAP_BATCH_TOKENS = 2048  # token budget of one batch of the KL-gap forward passes


class SAEResult(NamedTuple):
    """The trained SAE's validation metrics (`sae/metrics.json`)."""

    key: str
    fvu: float
    l0: float
    l0_crossfit: float  # 2-fold cross-fitted L0 over calibration + validation documents (NaN: not calibrated)
    dead_fraction: float
    mse: float
    kl_gap_recovered: float
    val_tokens: int
    train_steps: int
    train_tokens_seen: int
    weights_sha256: str
    mlflow_run_id: str


def count_sae_rows(store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: np.ndarray) -> int:
    allowed = pa.array(np.asarray(doc_ids, np.int64))
    n = 0
    for rec in manifest["shards"]:
        with store.open_read(paths.shard(rec["index"])) as f:
            t = pq.read_table(f, columns=["doc_id", "in_sae"])
        n += int(pc.sum(pc.and_(t["in_sae"], pc.is_in(t["doc_id"], value_set=allowed))).as_py() or 0)
    return n


def _epochs(
    store: Store, paths: RunPaths, manifest: dict[str, Any], docs: np.ndarray, seed: int
) -> Iterator[np.ndarray]:
    for epoch in range(10**9):  # the trainer stops after total_steps
        yield from act.iter_diff_chunks(store, paths, manifest, docs, order_seed=seed + epoch)


def sae_key(cfg: SAEConfig, activations: Activations) -> str:
    return stage_key("sae", train, cfg.model_dump(), activations.fingerprint)


def sae_done(ctx: RunContext, key: str) -> SAEResult | None:
    out = read_marker(ctx.store, ctx.paths.marker("sae"), key, SAEResult)
    if out is None or not all(ctx.store.exists(ctx.paths.url("sae", f)) for f in SAE_FILES):
        return None
    return out


def train(ctx: RunContext, cfg: SAEConfig, activations: Activations, models: ModelsConfig, key: str) -> SAEResult:
    """Train, evaluate, log to MLflow, and publish `sae/` on the store (metrics.json last)."""
    done = sae_done(ctx, key)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    manifest = read_manifest(ctx, activations)
    train_docs, val_docs = split_docs(int(manifest["n_docs"]), cfg.val_fraction, cfg.seed)
    train_docs, calibration_docs = split_calibration(train_docs, cfg.calibration_fraction, cfg.seed)
    n_train = count_sae_rows(store, paths, manifest, train_docs)
    budget = cfg.train_tokens(n_train)
    total_steps = max(1, math.ceil(budget / cfg.batch_size))
    sample = np.concatenate(list(_take(act.iter_diff_chunks(store, paths, manifest, train_docs, cfg.seed), 16384)))
    d_in = int(sample.shape[1])

    exp = ctx.mlflow_experiment()
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"sae-k{cfg.k}-F{cfg.n_latents}") as mrun:
        mlflow.log_params(
            {
                **flat_params("sae.", cfg.model_dump()),
                "activations.fingerprint": activations.fingerprint,
                "layer": models.layer,
                "base": models.base,
                "finetuned": models.finetuned,
                "train_tokens": n_train,
                "calibration_docs": len(calibration_docs),
                "total_steps": total_steps,
            }
        )
        batches = shuffled_batches(
            _epochs(store, paths, manifest, train_docs, cfg.seed),
            cfg.batch_size,
            cfg.shuffle_buffer,
            cfg.seed,
        )
        result = train_sae(
            cfg,
            batches,
            d_in,
            torch.from_numpy(sample),
            total_steps,
            on_step=lambda step, m: mlflow.log_metrics(m, step=step),
        )
        sae = result.sae.eval()
        if cfg.calibration_tokens > 0:  # never the validation documents
            chunks = _take(act.iter_diff_chunks(store, paths, manifest, calibration_docs, cfg.seed),
                           cfg.calibration_tokens)  # fmt: skip
            mlflow.log_metric("threshold_ema", float(sae.threshold))
            calibrate_threshold(sae, (torch.from_numpy(np.array(c)) for c in chunks), cfg.k)
            mlflow.log_metric("threshold_calibrated", float(sae.threshold))
        held = np.union1d(calibration_docs, val_docs)
        l0_crossfit = float("nan")
        if cfg.calibration_tokens > 0 and len(held) >= 2:  # does calibration carry over to unseen documents?
            by_doc = act.read_diffs_by_doc(store, paths, manifest, held, 2 * cfg.calibration_tokens, cfg.seed)
            if len(by_doc) >= 2:
                l0_crossfit = crossfit_l0(sae, [torch.from_numpy(x) for x in by_doc.values()], cfg.k, cfg.seed)
        val = evaluate(
            sae,
            (torch.from_numpy(np.array(c)) for c in act.iter_diff_chunks(store, paths, manifest, val_docs)),
        )
        pair = MODEL_CACHE.pair(ctx, models)
        sae = sae.to(pair.device)
        docs = act.read_docs(store, paths, val_docs)
        pad_id = pair.tokenizer.pad_token_id or 0
        gap = kl_gap_recovered(pair.base, pair.finetuned, models.layer, sae, docs, pad_id, KL_GAP_BATCH_TOKENS)
        final = {
            "fvu": val.fvu,
            "l0": val.l0,
            "l0_crossfit": l0_crossfit,
            "dead_fraction": val.dead_fraction,
            "mse": val.mse,
            "kl_gap_recovered": gap,
            "val_tokens": val.n_tokens,
            "train_steps": result.steps,
            "train_tokens_seen": result.tokens,
        }
        meta = {
            "layer": models.layer,
            "base": models.base,
            "finetuned": models.finetuned,
            "activations_fingerprint": activations.fingerprint,
            "sae_config": cfg.model_dump(),
        }
        return publish(ctx, sae.cpu(), meta, final, key, mrun.info.run_id)


def publish(
    ctx: RunContext, dictionary: Any, meta: dict[str, Any], final: dict[str, float], key: str, run_id: str,
    extra: dict[str, pa.Table] | None = None,
) -> SAEResult:  # fmt: skip
    """Any method's trained dictionary (tasks/methods.py too): its final metrics to the active MLflow run, the
    dictionary (`save(dir, metadata)`) to MLflow's artifacts and `sae/` on the store with the `extra` tables, then
    `sae/metrics.json`, last: the stage's marker. `final` holds every SAEResult metric."""
    store, paths = ctx.store, ctx.paths
    mlflow.log_metrics({(k if k.startswith(("val_", "train_")) else f"val_{k}"): float(v)
                        for k, v in final.items() if not math.isnan(float(v))})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dictionary.save(tmp, metadata=meta)
        mlflow.log_artifacts(tmp, artifact_path="sae")
        store.put_file(f"{tmp}/sae.safetensors", paths.url("sae", "sae.safetensors"))
        store.put_file(f"{tmp}/cfg.json", paths.url("sae", "cfg.json"))
        sha = act.file_sha256(f"{tmp}/sae.safetensors")
    for name, table in (extra or {}).items():
        store.write_parquet(paths.url("sae", f"{name}.parquet"), table)
    out = SAEResult(key=key, weights_sha256=sha, mlflow_run_id=run_id, **final)
    write_marker(store, paths.marker("sae"), out)  # last: marks the stage's output complete
    return out


@task(name="train-sae", cache_policy=STAGE_CACHE, **IO_RETRY)
def train_sae_task(
    ctx: RunContext, cfg: SAEConfig, activations: Activations, models: ModelsConfig, key: str
) -> SAEResult:
    return train(ctx, cfg, activations, models, key)


def _take(chunks: Iterator[np.ndarray], n_rows: int) -> Iterator[np.ndarray]:
    got = 0
    for c in chunks:
        yield c[: n_rows - got]
        got += min(len(c), n_rows - got)
        if got >= n_rows:
            return
