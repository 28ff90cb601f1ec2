"""Stage 2 task: train the BatchTopK diff-SAE on the activation shards, tracked in MLflow.

Cached on (SAE config, activation manifest fingerprint, task source): changing `sae.k` retrains, rerunning
unchanged does not. Data streams from the shards on the store through a shuffle buffer that mixes shards; the
train/validation split is by document. Final validation metrics: FVU, L0, dead fraction and kl_gap_recovered =
1 − Σ KL(p_ft ‖ p_patch(h_base + d̂)) / Σ KL(p_ft ‖ p_patch(h_base)) over the validation tokens.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from diffsae.config import ModelsConfig, SAEConfig
from storage import activations as act
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, STAGE_CACHE

SAE_FILES = ("sae.safetensors", "cfg.json", "metrics.json")


def split_docs(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, validation doc ids): a seeded random split by document, at least one of each."""
    rng = np.random.default_rng(seed + 7919)
    is_val = rng.random(n_docs) < val_fraction
    if n_docs >= 2 and (is_val.all() or not is_val.any()):
        is_val[:] = False
        is_val[rng.integers(n_docs)] = True
    ids = np.arange(n_docs)
    return ids[~is_val], ids[is_val]


def count_sae_rows(store: Store, paths: RunPaths, manifest: dict[str, Any], doc_ids: np.ndarray) -> int:
    import pyarrow as pa

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


def sae_ok(store: Store, paths: RunPaths, key: str) -> bool:
    try:
        return store.read_json(paths.url("sae", "metrics.json")).get("key") == key and all(
            store.exists(paths.url("sae", f)) for f in SAE_FILES
        )
    except (FileNotFoundError, ValueError):
        return False


def kl_gap_recovered(pair: Any, layer: int, sae: Any, docs: list[Any], batch_tokens: int) -> float:
    """1 − Σ KL(p_ft‖p_patch(h_base + d̂)) / Σ KL(p_ft‖p_patch(h_base)) over the docs' analysed tokens."""
    from diffsae.attribution import attribute_batch
    from diffsae.extract import pad_batch, plan_batches

    num = den = 0.0
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        ids_BT, mask_BT = pad_batch([docs[i] for i in idx], pair.tokenizer.pad_token_id or 0, pair.device)
        out = attribute_batch(pair.base, pair.finetuned, layer, ids_BT, mask_BT, sae, steps=1)
        num += float(np.nansum(out.kl_patch_recon_BT))
        den += float(np.nansum(out.kl_patch_base_BT))
    return 1.0 - num / den if den > 0 else float("nan")


@task(name="train-sae", cache_policy=STAGE_CACHE, **IO_RETRY)
def train_sae_task(
    store_root: str,
    run: str,
    sae_cfg: dict[str, Any],
    manifest_fingerprint: str,
    models: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    """Train, evaluate, log to MLflow, and publish `sae/` on the store. Returns the final metrics."""
    import mlflow
    import torch

    from diffsae.shuffle import shuffled_batches
    from diffsae.train import evaluate, train_sae
    from storage.mlflow_setup import experiment, flat_params
    from tasks.extract import _docs, _pair

    cfg = SAEConfig.model_validate(sae_cfg)
    paths, store = RunPaths(store_root, run), Store(store_root)
    manifest = act.read_manifest(store, paths)
    if manifest is None or manifest["fingerprint"] != manifest_fingerprint:
        raise RuntimeError("activation manifest missing or changed: rerun extraction")
    train_docs, val_docs = split_docs(int(manifest["n_docs"]), cfg.val_fraction, cfg.seed)
    n_train = count_sae_rows(store, paths, manifest, train_docs)
    budget = cfg.train_tokens(n_train)
    total_steps = max(1, math.ceil(budget / cfg.batch_size))
    sample = np.concatenate(
        list(_take(act.iter_diff_chunks(store, paths, manifest, train_docs, cfg.seed), 16384))
    )
    d_in = int(sample.shape[1])

    exp = experiment(paths)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"sae-k{cfg.k}-F{cfg.n_latents}") as mrun:
        mlflow.log_params(
            {
                **flat_params("sae.", cfg.model_dump()),
                "activations.fingerprint": manifest_fingerprint,
                "layer": models["layer"],
                "base": models["base"],
                "finetuned": models["finetuned"],
                "train_tokens": n_train,
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
        val = evaluate(
            sae,
            (torch.from_numpy(np.array(c)) for c in act.iter_diff_chunks(store, paths, manifest, val_docs)),
        )
        models_cfg = ModelsConfig.model_validate(models)
        pair = _pair(models_cfg.model_dump_json())
        sae = sae.to(pair.device)
        docs = _docs(
            manifest["data_path"], manifest["tokenizer"], manifest["max_tokens"], manifest["max_docs"]
        )
        gap = kl_gap_recovered(pair, models_cfg.layer, sae, [docs[i] for i in val_docs], 2048)
        final = {
            "fvu": val.fvu,
            "l0": val.l0,
            "dead_fraction": val.dead_fraction,
            "mse": val.mse,
            "kl_gap_recovered": gap,
            "val_tokens": val.n_tokens,
            "train_steps": result.steps,
            "train_tokens_seen": result.tokens,
        }
        mlflow.log_metrics({(k if k.startswith(("val_", "train_")) else f"val_{k}"): float(v)
                            for k, v in final.items()})  # before the weights' sha256 is added
        meta = {
            "layer": models_cfg.layer,
            "base": models_cfg.base,
            "finetuned": models_cfg.finetuned,
            "activations_fingerprint": manifest_fingerprint,
            "sae_config": cfg.model_dump(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            sae.cpu().save(tmp, metadata=meta)
            mlflow.log_artifacts(tmp, artifact_path="sae")
            store.put_file(f"{tmp}/sae.safetensors", paths.url("sae", "sae.safetensors"))
            store.put_file(f"{tmp}/cfg.json", paths.url("sae", "cfg.json"))
            final["weights_sha256"] = act.file_sha256(f"{tmp}/sae.safetensors")
        # metrics.json last: it marks the stage's output complete.
        store.write_json(
            paths.url("sae", "metrics.json"), {"key": key, "mlflow_run_id": mrun.info.run_id, **final}
        )
    return {"key": key, **final}


def _take(chunks: Iterator[np.ndarray], n_rows: int) -> Iterator[np.ndarray]:
    got = 0
    for c in chunks:
        yield c[: n_rows - got]
        got += min(len(c), n_rows - got)
        if got >= n_rows:
            return
