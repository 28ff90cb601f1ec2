"""`diffsae export --format saelens`: a run's diff-SAE in SAELens's on-disk layout, loadable by
`sae_lens.SAE.load_from_disk(DIR)` with no diffsae installed.

Why this layout: it is what SAELens (and SAEDashboard, Neuronpedia's tooling, which load through it) reads. The
format followed is SAELens 6.54.12 (`sae_lens/saes/sae.py` `SAE.save_model` / `TrainingSAE.save_inference_model`,
`sae_lens/saes/jumprelu_sae.py`, `sae_lens/saes/batchtopk_sae.py`, `sae_lens/constants.py`):

    DIR/cfg.json                  JumpReLUSAEConfig.to_dict(): d_in, d_sae, dtype, device, apply_b_dec_to_input,
                                  normalize_activations, reshape_activations, architecture, metadata {...}
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                                  threshold [d_sae]
    DIR/README.md                 a model card (what the input is, how to load it, the run's metrics)

SAELens saves a trained BatchTopK SAE as a JumpReLU SAE whose per-latent threshold is the learned global threshold
(`BatchTopKTrainingSAE.process_state_dict_for_saving_inference`); so do we. SAELens's JumpReLU inference is

    acts  = relu(pre) * (pre > threshold),  pre = (x - b_dec) @ W_enc + b_enc
    x_hat = acts @ W_dec + b_dec

and diffsae's (`diffsae/sae.py`) is the same on `x * scale`, with `x_hat` divided by `scale`. SAELens has no exact
inference-time input scaling (`normalize_activations="expected_average_only_in"` is applied by its training-time
activation scaler, not by `SAE.encode`), so `scale` is folded into the weights exactly as SAELens's own
`fold_activation_norm_scaling_factor` does: W_enc * s, W_dec / s, b_dec / s (b_enc and the threshold unchanged,
since the pre-activations are identical). SAELens's encode/decode on raw (unscaled) diff rows then equal diffsae's
`encode`/`decode`; feature activations stay in diffsae's scaled units.

The input is a *difference* h_finetuned − h_base at `metadata.hook_name`, never one model's activations: the
metadata says so (`input`, `diff_*`, `base_model_name`), and the model card repeats it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffsae.sae import BatchTopKSAE
from exports.common import ExportError, RunInfo, read_run_info
from storage.context import RunContext

SAELENS_VERSION = "6.54.12"  # the SAELens release whose format this follows (cfg.json metadata.sae_lens_version)
WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
TENSOR_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",),
                 "threshold": ("d_sae",)}  # fmt: skip


class SAELensExport(NamedTuple):
    out_dir: str
    d_in: int
    d_sae: int
    threshold: float  # the global threshold every latent gets (scaled units)
    scale: float  # diffsae's input scale, folded into the weights
    files: list[str]


def saelens_tensors(sae: BatchTopKSAE, fold_scale: bool = True) -> dict[str, Tensor]:
    """SAELens JumpReLU tensors equivalent to `sae` on raw inputs (float32, CPU, contiguous).

    `fold_scale=False` leaves diffsae's `scale` out: an export that is wrong for any scale != 1, kept only so that
    the tests can show that the comparison with diffsae catches it."""
    s = float(sae.scale) if fold_scale else 1.0
    thr = max(float(sae.threshold), 0.0)  # diffsae clamps the threshold at 0; relu makes that implicit in SAELens
    with torch.no_grad():
        out = {
            "W_enc": sae.W_enc_DF.float() * s,
            "W_dec": sae.W_dec_FD.float() / s,
            "b_enc": sae.b_enc_F.float(),
            "b_dec": sae.b_dec_D.float() / s,
            "threshold": torch.full((sae.n_latents,), thr, dtype=torch.float32),
        }
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def saelens_cfg(sae: BatchTopKSAE, info: RunInfo) -> dict[str, Any]:
    """cfg.json: JumpReLUSAEConfig's fields and SAELens's metadata keys, plus what makes the input a diff."""
    metrics = info.sae_metrics
    metadata: dict[str, Any] = {
        # SAELens's own keys (SAEMetadata; LanguageModelSAERunnerConfig -> metadata in sae_lens/saes/sae.py)
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,  # trained by diffsae, not SAELens
        "model_name": info.finetuned,
        "hook_name": info.hook_name,
        "hook_head_index": None,
        "context_size": info.context_size,
        "model_from_pretrained_kwargs": {},
        "training_architecture": "batchtopk",
        "training_architecture_details": {"k": sae.k, "threshold": "global, learned (diffsae)"},
        # diffsae: the input is a difference of two models' residual streams
        "input": "diff",
        "diff": "h_finetuned - h_base",
        "diff_hook_name": f"{info.hook_name}:diff(finetuned-base)",
        "base_model_name": info.base,
        "finetuned_model_name": info.finetuned,
        "layer": info.layer,
        "activation_units": "scaled: diffsae's input scale is folded into W_enc, W_dec and b_dec",
        "diffsae_scale": float(sae.scale),
        "diffsae_threshold": float(sae.threshold),
        "diffsae_run": info.run,
        "diffsae_store": info.store,
        "activations_fingerprint": info.activations_fingerprint,
        "diffsae_weights_sha256": metrics.get("weights_sha256"),
        "diffsae_sae_config": info.sae_cfg.get("sae_config", {}),
        "diffsae_metrics": {k: metrics.get(k) for k in ("fvu", "l0", "dead_fraction", "kl_gap_recovered", "mse")},
    }
    return {
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": "jumprelu",
        "metadata": metadata,
    }


def write_saelens_dir(
    sae: BatchTopKSAE, info: RunInfo, out_dir: str | os.PathLike[str], fold_scale: bool = True
) -> SAELensExport:
    """Write cfg.json, sae_weights.safetensors and README.md into `out_dir` (created; files replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors = saelens_tensors(sae, fold_scale=fold_scale)
    cfg = saelens_cfg(sae, info)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, info))
    thr = float(tensors["threshold"][0]) if sae.n_latents else 0.0
    files = [str(out / f) for f in (CFG_FILE, WEIGHTS_FILE, "README.md")]
    return SAELensExport(str(out), sae.d_in, sae.n_latents, thr, float(sae.scale), files)


def load_run_sae(ctx: RunContext) -> BatchTopKSAE:
    """The run's trained SAE (a local copy of `sae/` on S3 stores), on CPU, in eval mode."""
    return BatchTopKSAE.load(ctx.mirror(ctx.paths.url("sae"))).eval()


def export_saelens(ctx: RunContext, out_dir: str | os.PathLike[str]) -> SAELensExport:
    """Export the run's SAE (its training stage must be done) into `out_dir` in SAELens's layout."""
    info = read_run_info(ctx)
    return write_saelens_dir(load_run_sae(ctx), info, out_dir)


def model_card(cfg: dict[str, Any], info: RunInfo) -> str:
    md = cfg["metadata"]
    metrics = md["diffsae_metrics"]
    fmt = {k: ("-" if v is None else f"{v:.4g}") for k, v in metrics.items()}
    return f"""---
library_name: saelens
tags: [sparse-autoencoder, model-diffing, diffsae, batchtopk, jumprelu]
---

# diff-SAE: {info.finetuned} − {info.base}, layer {info.layer}

A BatchTopK sparse autoencoder trained by [diffsae] on the **difference** of residual-stream activations
`h_finetuned − h_base` at `{info.hook_name}` (the output of decoder block {info.layer}), exported in SAELens's
on-disk format (SAELens {SAELENS_VERSION}) as a JumpReLU SAE with the learned global threshold.

**The input is a difference, not one model's activations.** Run both models on the same tokens, take
`{info.hook_name}` of each, subtract (finetuned − base), and encode that. Attaching this SAE to a single model's
hook (e.g. with `HookedSAETransformer.add_sae`) gives meaningless activations.

| | |
|---|---|
| base model | `{info.base}` |
| finetuned model | `{info.finetuned}` |
| hook | `{info.hook_name}` (diff) |
| d_in / d_sae | {cfg["d_in"]} / {cfg["d_sae"]} |
| k (mean L0 in training) | {md["training_architecture_details"]["k"]} |
| threshold (all latents) | {max(md["diffsae_threshold"], 0.0):.6g} |
| context size (tokens per document) | {info.context_size} |
| diffsae run | `{info.run}` on `{info.store}` |
| activations fingerprint | `{info.activations_fingerprint}` |
| validation FVU / L0 / dead fraction | {fmt["fvu"]} / {fmt["l0"]} / {fmt["dead_fraction"]} |
| KL gap recovered | {fmt["kl_gap_recovered"]} |

diffsae multiplies its inputs by a fixed scale ({md["diffsae_scale"]:.6g}) before encoding; that scale is folded
into `W_enc`, `W_dec` and `b_dec` here, so this SAE takes raw (unscaled) diff rows, and its feature activations
equal diffsae's (which are in scaled units).

```python
from sae_lens import SAE

sae = SAE.load_from_disk("path/to/this/folder")
acts = sae.encode(h_ft - h_base)   # [tokens, {cfg["d_sae"]}]
recon = sae.decode(acts)           # ≈ h_ft − h_base
```

[diffsae]: exported by `diffsae export --format saelens`
"""
