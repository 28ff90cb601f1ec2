"""Attribute whole documents, batched, and refine those whose completeness misses the tolerance.

Why: `diffsae.attribution.attribute_batch` works on padded tensors; the attribution stage (tasks/attribute.py),
tests and benches work on documents (`diffsae.data.Doc`). Here a batch of documents is padded, attributed with the
configured quadrature and token selection (`AttributionConfig`, `tokens` resolved), and cut back per document:
per-token KLs (PATCH_COLUMNS), the latent records, and the completeness |Σ attr − drop| / |drop|. A document
above `max_rel_error` first gets the Gauss rule's Kronrod extension inside the batch (n + 1 more points on its rows,
the n gradients already made reused: `attribute_batch(max_rel_error=...)`); one still above it is attributed again
with twice the points (up to `max_steps`) and in float32, keeping the better result, so a low default number of
points or bfloat16 gradient passes (`precision`) never ship a bad number.

    out = attribute_docs(pair, layer, sae, docs, cfg.resolved(n_tokens), skip_first, cfg.steps, kls)
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch

from diffsae.attribution import Selection, attribute_batch, doc_seed
from diffsae.config import AttributionConfig
from diffsae.data import Doc
from diffsae.extract import States, pad_batch
from diffsae.models import ModelPair
from diffsae.patching import Precision, fast_bfloat16
from diffsae.sae import BatchTopKSAE

NOISE_NATS = 1e-5  # a completeness gap below this is float noise: never worth refining
# Per-token columns of a document's attribution (the analysis tokens table's additions, storage/schemas.py).
PATCH_COLUMNS = ("kl", "kl_patch_base", "kl_patch_bias", "kl_patch_recon", "attr_weight")


def gradient_precision(cfg: AttributionConfig, device: torch.device) -> Precision:
    """`cfg.precision`, with `auto` resolved: bfloat16 where `device` multiplies it natively, else float32."""
    if cfg.precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return cfg.precision


class DocAttribution(NamedTuple):
    """One document's attribution: per-token KLs (PATCH_COLUMNS -> [n]), its records, its completeness."""

    doc: Doc
    per_token: dict[str, np.ndarray]
    records: dict[str, np.ndarray]  # pos, latent_id, activation, kl_attribution
    rel_error: float  # |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|
    steps: int


def _padded(per_doc: Mapping[int, np.ndarray], docs: list[Doc], T: int) -> torch.Tensor:
    """Per-document float32 arrays [n_tokens, ...] by doc_id, right-padded with zeros into [B, T, ...], as
    `pad_batch` lays out the documents' tokens."""
    first = per_doc[docs[0].doc_id]
    out = torch.zeros(len(docs), T, *first.shape[1:], dtype=torch.float32)
    for b, d in enumerate(docs):
        out[b, : len(d.token_ids)] = torch.from_numpy(per_doc[d.doc_id])
    return out


def attribute_docs(
    pair: ModelPair, layer: int, sae: BatchTopKSAE, docs: list[Doc], cfg: AttributionConfig, skip_first: int,
    steps: int, kls: Mapping[int, np.ndarray] | None = None, precision: Precision | None = None,
    states: Mapping[int, np.ndarray] | None = None,
) -> list[DocAttribution]:  # fmt: skip
    """Attribute one batch of whole documents; a document whose completeness misses `cfg.max_rel_error` (by more
    than float noise) first gets the Kronrod extension inside the batch, and if it still misses it is attributed
    again with twice the points, up to `cfg.max_steps`, keeping the better one.
    kls: extraction's per-token KL by doc_id (storage.activations.read_doc_kls): the base stops at `layer`.
    states: extraction's stored unpatched runs by doc_id, float32 [n_tokens, 3, D] (h_base, h_ft, x_ft:
    storage.activations.read_doc_states; needs kls): neither model runs unpatched.
    precision: of the gradient passes (None: `cfg.precision`, `auto` resolved by `gradient_precision`)."""
    if cfg.tokens not in ("all", "select"):
        raise ValueError(f"attribution.tokens {cfg.tokens!r} must be resolved first (AttributionConfig.resolved)")
    ids_BT, mask_BT = pad_batch(docs, pair.tokenizer.pad_token_id or 0, pair.device)
    select = None
    if cfg.tokens == "select":
        seeds = [doc_seed(cfg.select_seed, d.doc_id) for d in docs]
        select = Selection(cfg.select_top, cfg.select_sample, seeds)
    if states is not None and kls is None:
        raise ValueError("stored states need extraction's kls too")
    kl_BT = None if kls is None else _padded(kls, docs, ids_BT.shape[1])
    padded = None if states is None else States(*_padded(states, docs, ids_BT.shape[1]).to(pair.device).unbind(2))
    kronrod_ok = 2 * steps + 1 <= cfg.max_steps  # in-batch refinement: the Gauss rule's Kronrod extension
    out = attribute_batch(
        pair.base, pair.finetuned, layer, ids_BT, mask_BT, sae, steps, skip_first, rule=cfg.rule, select=select,
        kl_BT=kl_BT, max_rel_error=cfg.max_rel_error if kronrod_ok else None, noise_nats=NOISE_NATS,
        precision=precision or gradient_precision(cfg, pair.device), states=padded,
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
            int(out.steps_B[b]),
        ))  # fmt: skip
    redo = [b for b in range(len(docs)) if rel_B[b] > cfg.max_rel_error and gap_B[b] > NOISE_NATS]
    if redo and 2 * steps <= cfg.max_steps:
        finer = attribute_docs(pair, layer, sae, [docs[b] for b in redo], cfg, skip_first, 2 * steps, kls, "float32",
                               states)  # fmt: skip
        for b, f in zip(redo, finer):
            if f.rel_error < result[b].rel_error:
                result[b] = f
    return result
