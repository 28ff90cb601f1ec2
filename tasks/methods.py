"""Stage 2 for the other methods (issue 17): the BatchTopK crosscoder and the activation-difference lens, trained on
the run's activations and published like the diff-SAE (`tasks.train.publish`): `sae/` (weights, cfg.json,
metrics.json last) under the method's own prefix (`methods/<method>/`, storage/paths.py) with the same
`SAEResult`, so the attribution, ranking, validation and dashboards stages run on them unchanged (diffsae/methods.py
has the contract).

Both use the diff-SAE's document split (`diffsae.split.sae_splits` with the `sae` section's seed and fractions): they
train on the same `fit` documents, calibrate on the same calibration documents and are measured on the same
validation documents, so recovery v2's held-out documents are held out for every method.

- crosscoder: `sae` settings (width, k, batch size, lr, token budget, AuxK), so the comparison is at matched width and
  L0. It needs both residuals, which extraction stores only with `extract.save_raw`: the stage recomputes them with
  extraction's own paired forward (`diffsae.methods.pair_residuals`) rather than re-running extraction, so adding
  the method recomputes nothing else. Its Latent Scaling ratios (ν^ε, ν^r on the fit tokens) and decoder norms go to
  `sae/latent_scaling.parquet` (SQL view `latent_scaling`).
- adl: the mean diff over positions skip_first .. skip_first + adl.first − 1 of the fit documents, from the stored
  diffs; one entry, its logit-lens tokens in cfg.json.
"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pyarrow as pa
import torch
from prefect import task

from diffsae import crosscoder as xc
from diffsae.adl import adl_direction, adl_tokens
from diffsae.config import ADLConfig, ModelsConfig, SAEConfig
from diffsae.methods import DirectionDict, pair_residuals
from diffsae.patching import kl_gap_recovered
from diffsae.split import sae_splits
from storage import activations as act
from storage.context import RunContext
from storage.mlflow_setup import flat_params
from storage.schemas import LATENT_SCALING
from tasks.common import IO_RETRY, STAGE_CACHE, stage_key
from tasks.extract import Activations, read_manifest
from tasks.models import MODEL_CACHE
from tasks.train import KL_GAP_BATCH_TOKENS, SAEResult, publish, sae_done

LOG_EVERY = 10  # crosscoder training steps between MLflow metric logs


def crosscoder_key(cfg: SAEConfig, activations: Activations, skip_first: int) -> str:
    return stage_key("crosscoder", train_crosscoder, cfg.model_dump(), activations.fingerprint, skip_first)


def adl_key(cfg: ADLConfig, sae_cfg: SAEConfig, activations: Activations) -> str:
    split = {k: sae_cfg.model_dump()[k] for k in ("val_fraction", "calibration_fraction", "seed")}
    return stage_key("adl", fit_adl, cfg.model_dump(), split, activations.fingerprint)


def _metrics(diff_ND: torch.Tensor, acts_NF: torch.Tensor, recon_ND: torch.Tensor) -> dict[str, float]:
    """FVU and MSE of the diff, L0 and dead fraction over validation tokens (as diffsae.train.evaluate)."""
    err = (diff_ND - recon_ND).double().pow(2).sum()
    centred = (diff_ND - diff_ND.mean(dim=0)).double().pow(2).sum()
    return {
        "fvu": float(err / centred.clamp_min(1e-30)),
        "l0": float((acts_NF > 0).sum()) / max(1, len(diff_ND)),
        "dead_fraction": float(((acts_NF > 0).sum(dim=0) == 0).float().mean()),
        "mse": float(err) / max(1, diff_ND.numel()),
    }


def train_crosscoder(
    ctx: RunContext, cfg: SAEConfig, activations: Activations, models: ModelsConfig, batch_tokens: int,
    skip_first: int, key: str,
) -> SAEResult:  # fmt: skip
    """Recompute both residuals, train, calibrate, evaluate on the validation documents, publish."""
    done = sae_done(ctx, key)
    if done is not None:
        return done
    docs = act.read_docs(ctx.store, ctx.paths)
    pair = MODEL_CACHE.pair(ctx, models)
    pad = pair.tokenizer.pad_token_id or 0
    h = pair_residuals(pair.base, pair.finetuned, models.layer, docs, batch_tokens, pair.device, skip_first, pad)
    splits = {role: [int(d) for d in ids if int(d) in h] for role, ids in sae_splits(len(docs), cfg).items()}
    fit = torch.cat([h[d] for d in splits["fit"]])  # [N, 2, D]
    n_steps = max(1, math.ceil(cfg.train_tokens(len(fit)) / cfg.batch_size))
    exp = ctx.mlflow_experiment()
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"crosscoder-k{cfg.k}-F{cfg.n_latents}") as mrun:
        mlflow.log_params({**flat_params("sae.", cfg.model_dump()), "method": "crosscoder", "layer": models.layer,
                           "activations.fingerprint": activations.fingerprint, "train_tokens": len(fit),
                           "total_steps": n_steps})  # fmt: skip
        tr = xc.train_crosscoder(
            fit, cfg.n_latents, cfg.k, cfg.batch_size, n_steps, cfg.learning_rate, cfg.seed, cfg.auxk_alpha,
            cfg.dead_tokens, on_step=lambda s, m: mlflow.log_metrics(m, step=s) if s % LOG_EVERY == 0 else None,
        )  # fmt: skip
        cc = tr.cc.eval()
        if cfg.calibration_tokens > 0 and splits["calibration"]:
            xc.calibrate_threshold(cc, [torch.cat([h[d] for d in splits["calibration"]])[: cfg.calibration_tokens]],
                                   cfg.k)  # fmt: skip
        val = torch.cat([h[d] for d in splits["validation"]])
        with torch.no_grad():
            acts = cc.encode(val)
            hat = cc.decode(acts)
        final = _metrics(val[:, 1] - val[:, 0], acts, hat[:, 1] - hat[:, 0])
        val_docs = [d for d in docs if d.doc_id in set(splits["validation"])]
        view = xc.DiffView(cc.to(pair.device))
        final["kl_gap_recovered"] = kl_gap_recovered(pair.base, pair.finetuned, models.layer, view, val_docs, pad,
                                                     KL_GAP_BATCH_TOKENS)  # fmt: skip
        final.update(val_tokens=len(val), train_steps=tr.steps, train_tokens_seen=tr.steps * cfg.batch_size,
                     l0_crossfit=float("nan"))  # fmt: skip
        scaling = latent_scaling_table(cc.cpu(), fit)
        meta = {"method": "crosscoder", "layer": models.layer, "base": models.base, "finetuned": models.finetuned,
                "activations_fingerprint": activations.fingerprint, "sae_config": cfg.model_dump()}  # fmt: skip
        return publish(ctx, cc.cpu(), meta, final, key, mrun.info.run_id, {"latent_scaling": scaling})


def latent_scaling_table(cc: xc.CrossCoder, fit_NMD: torch.Tensor, chunk: int = 4096) -> pa.Table:
    """One row per latent: Latent Scaling ratios over the fit tokens and the decoder norms per model."""
    r = xc.latent_scaling_ratios(cc, list(fit_NMD.split(chunk)))
    norms = cc.decoder_norms_FM().detach()
    ratio = norms[:, xc.BASE] / norms[:, xc.FT].clamp_min(1e-30)
    return pa.table({
        "latent_id": np.arange(cc.n_latents, dtype=np.int32), "nu_error": r.nu_error.numpy(),
        "nu_recon": r.nu_recon.numpy(), "fit_tokens_fired": r.count.numpy().astype(np.int64),
        "norm_base": norms[:, xc.BASE].double().numpy(), "norm_ft": norms[:, xc.FT].double().numpy(),
        "norm_ratio": ratio.double().numpy(),
    }, schema=LATENT_SCALING)  # fmt: skip


@task(name="train-crosscoder", cache_policy=STAGE_CACHE, **IO_RETRY)
def train_crosscoder_task(
    ctx: RunContext, cfg: SAEConfig, activations: Activations, models: ModelsConfig, batch_tokens: int,
    skip_first: int, key: str,
) -> SAEResult:  # fmt: skip
    return train_crosscoder(ctx, cfg, activations, models, batch_tokens, skip_first, key)


def fit_adl(
    ctx: RunContext, cfg: ADLConfig, sae_cfg: SAEConfig, activations: Activations, models: ModelsConfig, key: str
) -> SAEResult:
    """The mean diff over the first positions of the fit documents (stored diffs), as a one-entry dictionary."""
    done = sae_done(ctx, key)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    manifest = read_manifest(ctx, activations)
    splits = sae_splits(int(manifest["n_docs"]), sae_cfg)
    everything = int(manifest.get("tokens") or 10**12)
    fit = act.read_diffs_by_doc(store, paths, manifest, splits["fit"], everything)  # rows from skip_first on
    delta_D = adl_direction([torch.from_numpy(x) for x in fit.values()], first=cfg.first, skip_first=0)
    dd = DirectionDict(delta_D[None])
    exp = ctx.mlflow_experiment()
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"adl-first{cfg.first}") as mrun:
        mlflow.log_params({"method": "adl", "adl.first": cfg.first, "layer": models.layer, "fit_docs": len(fit),
                           "activations.fingerprint": activations.fingerprint})  # fmt: skip
        val = torch.from_numpy(np.concatenate(list(act.iter_diff_chunks(store, paths, manifest, splits["validation"]))))
        with torch.no_grad():
            acts = dd.encode(val)
            final = _metrics(val, acts, dd.decode(acts))
        pair = MODEL_CACHE.pair(ctx, models)
        val_docs = act.read_docs(store, paths, splits["validation"])
        pad = pair.tokenizer.pad_token_id or 0
        gap = kl_gap_recovered(pair.base, pair.finetuned, models.layer, dd.to(pair.device), val_docs, pad,
                               KL_GAP_BATCH_TOKENS)  # fmt: skip
        seen = sum(min(len(x), cfg.first) for x in fit.values())
        final.update(kl_gap_recovered=gap, val_tokens=len(val), train_steps=0, train_tokens_seen=seen,
                     l0_crossfit=float("nan"))  # fmt: skip
        promoted, suppressed = adl_tokens(delta_D.to(pair.device), pair.finetuned, pair.tokenizer, 20)
        meta = {"method": "adl", "layer": models.layer, "base": models.base, "finetuned": models.finetuned,
                "activations_fingerprint": activations.fingerprint, "sae_config": sae_cfg.model_dump(),
                "adl_config": cfg.model_dump(), "delta_norm": float(delta_D.norm()),
                "promoted": promoted, "suppressed": suppressed}  # fmt: skip
        return publish(ctx, dd.cpu(), meta, final, key, mrun.info.run_id)


@task(name="fit-adl", cache_policy=STAGE_CACHE, **IO_RETRY)
def fit_adl_task(
    ctx: RunContext, cfg: ADLConfig, sae_cfg: SAEConfig, activations: Activations, models: ModelsConfig, key: str
) -> SAEResult:
    return fit_adl(ctx, cfg, sae_cfg, activations, models, key)
