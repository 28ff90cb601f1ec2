"""Integrated-gradients KL attribution of diff-SAE latents, per document, batched.

Why: a diff-SAE is trained on diff = h_ft − h_base at layer L. Its latents are ranked by how much of the
change of the next-token distributions, KL(p_ft ‖ p_base), each one explains: the KL attribution of
"Overcoming Sparsity Artifacts in Crosscoders to Interpret Chat-Tuning" (Minder et al. 2025), applied to a
diff-SAE, with integrated gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep
Networks").

How: both models run on the batch; h_base and h_ft are read at layer L (`diffsae.hooks.read_residual`) and
the SAE encodes diff in float32, giving activations a_{s,i} (d_i = W_dec_FD[i] / scale, b = b_dec_D / scale:
original units). The path

    h(α) = h_base + b + α · Σ_i a_i d_i     (α = 1: h_base + the SAE reconstruction of diff)

replaces the output of decoder block L of the FINETUNED model, and only the blocks above L run
(`diffsae.hooks.run_from`), and KL(α) = Σ_t w_t KL(p_ft,t ‖ p_patch,t(α)) over the document's analysed tokens
(w_t = 1 for every token, or the inverse-probability weights of a token selection, `select_tokens`). With
a quadrature rule (`quadrature`: nodes α_j, weights ω_j; midpoint α_j = (j + 0.5) / steps, ω_j = 1/steps, or
Gauss–Legendre) and ḡ_s = Σ_j ω_j ∇_{h_s} KL(α_j):

    attr_{s,i} = −a_{s,i} · (ḡ_s · d_i),    Σ_{s,i} attr_{s,i} ≈ KL(0) − KL(1)   (completeness, per doc)

so a positive attribution means the latent removes KL, i.e. it carries part of the finetuning change.
Several α steps are stacked in the batch dimension of one forward (`steps_per_forward`); the gradient is
taken with respect to the patched activation tensor only (model parameters are frozen during the call, and
their requires_grad flags and train/eval mode restored afterwards).

Conventions:
- Padding: `attention_mask_BT` marks real tokens. Right padding is the usual case; left padding works too,
  because in-document positions are computed from the mask and passed as `position_ids`. Padding positions
  are never patched (they keep h_ft) and never reported: their per-token values are NaN.
- skip_first: in-document positions < skip_first (default 1, the BOS attention sink, whose huge norm would
  dominate the diff) are NOT patched: they keep h_ft in every patched run, get no latent records and are
  left out of KL(α) (being unpatched and causally before every patched position, their patched KL is 0
  anyway). Their plain `kl` is still reported.
- Per-token arrays are laid out like `input_ids_BT` (column index); the records' `pos` is the in-document
  position (cumsum of the mask − 1), which equals the column index under right padding.
- Attributions of the active pairs use a gather of the W_dec rows of the active (token, latent) pairs,
  chunked over pairs: O(n_active · D) work, instead of the dense ḡ @ W_decᵀ product ([N, F],
  O(N · F · D)); with k ≈ 32 active latents of F = 73,728 the gather is ~2000× cheaper. The reconstruction
  Σ_i a_i d_i is built the same way.

`promoted_suppressed` reads each latent's direct effect on the finetuned model's logits, W_U · (γ ⊙ d_i),
where γ is the final norm's effective gain (RMSNorm: norm(ones) = its gain, which also covers Gemma's
(1 + w); LayerNorm: its weight; the final logit soft-cap, being monotone, is ignored).

Tests: `pytest tests/test_attribution.py`; throughput: `python bench/attribution.py`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from diffsae.head import kl_grad_hidden
from diffsae.patching import (
    PAIR_CHUNK,
    Precision,
    SAELike,
    States,
    autocast,
    frozen,
    model_device,
    nan_outside,
    patched_hidden,
    patched_runs,
)
from diffsae.quadrature import KRONROD_MAX_N, Rule, kronrod, quadrature

LOGIT_BUDGET_ELEMS = 1 << 27  # α steps stacked per forward: C · B · T · V at most this (logits are made in chunks)


class AttributionBatch(NamedTuple):
    """Per-token arrays are float32 [B, T] numpy (NaN at padding); records are flat arrays of equal length."""

    kl_BT: np.ndarray  # KL(p_ft ‖ p_base)
    kl_patch_base_BT: np.ndarray  # KL(p_ft ‖ p_ft with h_base patched in)
    kl_patch_bias_BT: np.ndarray  # ... with h_base + b patched in (= per-token KL(α=0))
    kl_patch_recon_BT: np.ndarray  # ... with h_base + reconstruction patched in (= per-token KL(α=1))
    batch_idx: np.ndarray  # int64 [P] row of the batch
    pos: np.ndarray  # int32 [P] position in the document
    latent_id: np.ndarray  # int32 [P]
    activation: np.ndarray  # float32 [P] a_{s,i} (SAE units)
    attribution: np.ndarray  # float32 [P] attr_{s,i}
    kl_drop_B: np.ndarray  # float32 [B] Σ_t w_t (KL_t(0) − KL_t(1)) over the analysed tokens (completeness target)
    attr_sum_B: np.ndarray  # float32 [B] Σ attributions of the document
    weight_BT: np.ndarray  # float32 [B, T] w_t, the weight of token t's KL in the attributed objective (NaN: padding)
    steps_B: np.ndarray  # int32 [B] quadrature points behind each document's attributions (2·steps + 1: Kronrod)


class Selection(NamedTuple):
    """Which tokens' KL the gradient passes attribute (`select_tokens`): per document, the `top` share of its
    analysed tokens by KL(0) (weight 1), and of the rest a Bernoulli(`sample`) draw seeded by `seeds[b]`
    (weight 1/`sample`); every other token gets weight 0."""

    top: float  # share of each document's analysed tokens always attributed, by KL(0) = KL(p_ft ‖ p_patch(h(0)))
    sample: float  # probability that each other token is drawn
    seeds: Sequence[int]  # [B] one seed per document (e.g. from its doc_id): draws independent of the batching


def doc_seed(seed: int, doc_id: int) -> int:
    """The selection seed of one document: a hash of the run's seed and its doc_id (independent of batching)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=7).digest(), "little")


def select_tokens(kl0_BT: torch.Tensor, analysed_BT: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Inverse-probability weights w [B, T] (float32) of the tokens whose KL is attributed (`Selection`).

    E[w_t] = 1 for every analysed token (w_t = 1 with probability 1 in the top share, 1/p with probability p
    otherwise), and the attributions are linear in w, so each one is an unbiased estimate of its value with every
    token attributed (Horvitz & Thompson 1952). Per document: ⌈top · n⌉ tokens by KL(0) (ties: earlier position),
    then n uniforms from a generator seeded by the document's seed, in position order."""
    if not (0.0 <= sel.top <= 1.0 and 0.0 < sel.sample <= 1.0):
        raise ValueError(f"selection needs 0 <= top <= 1 and 0 < sample <= 1, got {sel.top}, {sel.sample}")
    B, T = analysed_BT.shape
    if len(sel.seeds) != B:
        raise ValueError(f"selection has {len(sel.seeds)} seeds for {B} documents")
    w_BT = torch.zeros(B, T, dtype=torch.float32)
    kl0_BT, analysed_BT = kl0_BT.detach().float().cpu(), analysed_BT.cpu()
    for b in range(B):
        cols = analysed_BT[b].nonzero().flatten()  # [n] in position order
        n = cols.numel()
        if n == 0:
            continue
        n_top = math.ceil(sel.top * n)
        order_n = torch.sort(-kl0_BT[b, cols], stable=True).indices  # by KL(0), ties: earlier position
        top_n = torch.zeros(n, dtype=torch.bool)
        top_n[order_n[:n_top]] = True
        u_n = torch.rand(n, generator=torch.Generator().manual_seed(int(sel.seeds[b]) % (1 << 63)))
        drawn_n = ~top_n & (u_n < sel.sample)
        w_BT[b, cols] = torch.where(top_n, 1.0, torch.where(drawn_n, 1.0 / sel.sample, 0.0))
    return w_BT.to(analysed_BT.device)


def attribute_batch(
    base: nn.Module,
    finetuned: nn.Module,
    layer: int,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    sae: SAELike,
    steps: int = 16,
    skip_first: int = 1,
    steps_per_forward: int | None = None,
    rule: Rule = "midpoint",
    select: Selection | None = None,
    kl_BT: torch.Tensor | None = None,
    max_rel_error: float | None = None,
    noise_nats: float = 1e-5,
    precision: Precision = "float32",
    states: States | None = None,
) -> AttributionBatch:
    """Integrated-gradients KL attribution of the SAE latents for one batch of documents (module docstring).

    steps_per_forward: α steps stacked in the batch dimension of one finetuned forward (None: as many as fit
    in LOGIT_BUDGET_ELEMS logits entries, at least 1). rule, steps: the quadrature of the path (`quadrature`).
    select: attribute only a weighted selection of the tokens' KL (`select_tokens`; None: every analysed token,
    weight 1). Every latent record is still reported; its attribution is then an unbiased estimate.
    kl_BT: KL(p_ft ‖ p_base) per token when known (extraction's `kl`): the base model then runs only up to `layer`.
    states: h_base, h_ft at `layer` and the finetuned final hidden state when extraction stored them
    (`extract.save_states`; needs kl_BT): neither model runs unpatched, only the patched passes above `layer`.
    precision: the matmul precision of the blocks above `layer` in the gradient passes (`bfloat16`: autocast; the
    residual stream, the head and its gradient stay float32, and the KL columns and the completeness target are
    always float32, so completeness measures the rounding too).
    max_rel_error: with the Gauss–Legendre rule, a document whose completeness misses it (by more than `noise_nats`)
    gets the rule's Kronrod extension (`diffsae.quadrature.kronrod`: steps + 1 more points on its rows only, the
    steps gradients already made reused), kept where it is closer; `steps_B` says which rule each document got.
    """
    nodes_S, weights_S = quadrature(rule, steps)
    device = model_device(finetuned)
    W_dec_FD = sae.W_dec_FD.detach()
    scale = sae.scale.detach().float().to(device)  # scalar or [D]
    refine = max_rel_error is not None and rule == "gauss_legendre" and steps <= KRONROD_MAX_N

    with frozen(base, finetuned):
        r = patched_runs(base, finetuned, layer, input_ids_BT, attention_mask_BT, sae, skip_first, kl_BT, states)
        mask_BT, analysed_BT, docpos_BT, kl_BT, per_token = r.mask_BT, r.analysed_BT, r.docpos_BT, r.kl_BT, r.per_token
        x_ft_BTD, h_ft_BTD, start_BTD, delta_BTD = r.x_ft_BTD, r.h_ft_BTD, r.start_BTD, r.delta_BTD
        tok_P, lat_P, act_P = r.tok_P, r.lat_P, r.act_P
        del r
        ids_BT = input_ids_BT.to(device)
        mask_long_BT = mask_BT.long()
        B, T, D = h_ft_BTD.shape
        # w_t: the weight of token t's KL in the attributed objective Σ_t w_t KL_t(α)
        weight_BT = analysed_BT.float() if select is None else select_tokens(per_token["bias"], analysed_BT, select)
        V = int(finetuned.get_output_embeddings().weight.shape[0])

        def gradients(alphas: np.ndarray, rows: torch.Tensor) -> Iterator[torch.Tensor]:
            """∇_h KL(α) [b, T, D] at each α in turn, for the batch rows `rows`, several α stacked per forward."""
            b = rows.numel()
            chunk = min(len(alphas), steps_per_forward or max(1, LOGIT_BUDGET_ELEMS // max(1, b * T * V)))
            a_S = torch.tensor(alphas, device=device, dtype=torch.float32)  # [S]
            start, delta, x_ft, w = start_BTD[rows], delta_BTD[rows], x_ft_BTD[rows], weight_BT[rows]
            ids, mask, pos = ids_BT[rows], mask_long_BT[rows], docpos_BT[rows]
            for j0 in range(0, len(alphas), chunk):
                a_C = a_S[j0 : j0 + chunk]  # [C]
                C = a_C.numel()
                h_cTD = (start[None] + a_C[:, None, None, None] * delta[None]).reshape(C * b, T, D)
                h_cTD = h_cTD.detach().requires_grad_(True)  # [C*b, T, D]
                with torch.enable_grad(), autocast(device, precision):
                    x_cTD = patched_hidden(finetuned, layer, h_cTD, ids.repeat(C, 1), mask.repeat(C, 1),
                                           pos.repeat(C, 1)).float()  # fmt: skip
                # ∂KL/∂logits = w · (p_patch − p_ft) in closed form, back through the head at the weighted positions
                # only, a chunk at a time (diffsae.head: no [C, b, T, V] logits, no float32 log-softmax kept),
                # then one backward through the blocks above `layer` to h.
                dx_CBTD = kl_grad_hidden(finetuned, x_ft, x_cTD.view(C, b, T, -1), w)
                (grad_cTD,) = torch.autograd.grad(x_cTD, h_cTD, grad_outputs=dx_CBTD.view_as(x_cTD))
                del x_cTD, dx_CBTD, h_cTD
                yield from grad_cTD.view(C, b, T, D).unbind(0)

        # Integrated gradients: ḡ = Σ_j w_j ∇_h KL(α_j); the per-node gradients are kept only for a refinement.
        gbar_BTD = torch.zeros_like(h_ft_BTD)
        grads_S: list[torch.Tensor] = []
        for w, g in zip(weights_S, gradients(nodes_S, torch.arange(B, device=device))):
            gbar_BTD += g if rule == "midpoint" else float(w) * g  # midpoint: sum, divide once
            if refine:
                grads_S.append(g)
        if rule == "midpoint":
            gbar_BTD /= steps
        if not refine:
            del x_ft_BTD

    with torch.no_grad():
        b_N, t_N = analysed_BT.nonzero(as_tuple=True)  # [N] row-major, same order as the boolean index above
        batch_P, col_P = b_N[tok_P], t_N[tok_P]  # [P]
        zero_BT = torch.zeros_like(kl_BT)
        drop_BT = torch.where(analysed_BT, weight_BT * (per_token["bias"] - per_token["recon"]), zero_BT)  # [B, T]
        kl_drop_B = drop_BT.sum(dim=1)  # [B]
        attr_P = _pair_attributions(gbar_BTD[analysed_BT], tok_P, lat_P, act_P, W_dec_FD, scale, device)
        attr_sum_B = torch.zeros(B, device=device).index_add_(0, batch_P, attr_P)  # [B]
        steps_B = torch.full((B,), steps, dtype=torch.int32)

    if refine:
        gap_B = (attr_sum_B - kl_drop_B).abs()
        redo = ((gap_B / kl_drop_B.abs().clamp_min(1e-6) > max_rel_error) & (gap_B > noise_nats)).nonzero().flatten()
        if redo.numel():
            _, w_gauss, new_nodes, w_new = kronrod(steps)
            with frozen(base, finetuned):
                new_grads = list(gradients(new_nodes, redo))
            with torch.no_grad():
                gbar_K = sum(float(w) * g[redo] for w, g in zip(w_gauss, grads_S))
                gbar_K = gbar_K + sum(float(w) * g for w, g in zip(w_new, new_grads))  # [r, T, D]
                gbar_try = gbar_BTD.clone()
                gbar_try[redo] = gbar_K
                attr_K = _pair_attributions(gbar_try[analysed_BT], tok_P, lat_P, act_P, W_dec_FD, scale, device)
                sum_K = torch.zeros(B, device=device).index_add_(0, batch_P, attr_K)  # [B]
                better_B = torch.zeros(B, dtype=torch.bool, device=device)
                better_B[redo] = (sum_K - kl_drop_B).abs()[redo] < gap_B[redo]
                attr_P = torch.where(better_B[batch_P], attr_K, attr_P)
                attr_sum_B = torch.where(better_B, sum_K, attr_sum_B)
                steps_B[better_B.cpu()] = 2 * steps + 1
        del grads_S, x_ft_BTD

    return AttributionBatch(
        kl_BT=nan_outside(kl_BT, mask_BT),
        kl_patch_base_BT=nan_outside(per_token["base"], mask_BT),
        kl_patch_bias_BT=nan_outside(per_token["bias"], mask_BT),
        kl_patch_recon_BT=nan_outside(per_token["recon"], mask_BT),
        batch_idx=batch_P.cpu().numpy().astype(np.int64),
        pos=docpos_BT[batch_P, col_P].cpu().numpy().astype(np.int32),
        latent_id=lat_P.cpu().numpy().astype(np.int32),
        activation=act_P.cpu().numpy().astype(np.float32),
        attribution=attr_P.cpu().numpy().astype(np.float32),
        kl_drop_B=kl_drop_B.cpu().numpy().astype(np.float32),
        attr_sum_B=attr_sum_B.cpu().numpy().astype(np.float32),
        weight_BT=nan_outside(weight_BT, mask_BT),
        steps_B=steps_B.numpy(),
    )


@torch.no_grad()
def _pair_attributions(
    gbar_ND: torch.Tensor, tok_P: torch.Tensor, lat_P: torch.Tensor, act_P: torch.Tensor, W_dec_FD: torch.Tensor,
    scale: torch.Tensor, device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """attr = −a · (ḡ_s · d_i) on the active pairs only (gather of W_dec rows, chunked over pairs) [P]."""
    attr_P = torch.empty_like(act_P)
    for p0 in range(0, tok_P.numel(), PAIR_CHUNK):
        sl = slice(p0, p0 + PAIR_CHUNK)
        rows_PD = W_dec_FD[lat_P[sl].to(W_dec_FD.device)].float().to(device) / scale  # [p, D]
        attr_P[sl] = -act_P[sl] * (gbar_ND[tok_P[sl]] * rows_PD).sum(dim=-1)  # [p]
    return attr_P


def _final_norm_gain(model: nn.Module, d_model: int, device: torch.device) -> torch.Tensor:
    """Effective elementwise gain γ [D] of the final norm (ones when none is found)."""
    paths = ("model.norm", "model.model.norm", "model.language_model.norm", "transformer.ln_f")
    for path in paths + ("gpt_neox.final_layer_norm",):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            if isinstance(obj, nn.LayerNorm):
                w = obj.weight
                return (w.detach().float() if w is not None else torch.ones(d_model)).to(device)
            with torch.no_grad():  # RMSNorm of the all-ones vector is its gain (w, or 1 + w for Gemma)
                ones_1D = torch.ones(1, d_model, device=device, dtype=next(model.parameters()).dtype)
                return obj(ones_1D).float().reshape(d_model)  # [D]
    return torch.ones(d_model, device=device)


def promoted_suppressed(
    sae: SAELike, finetuned: nn.Module, tokenizer: Any, top_n: int, chunk_elems: int = 1 << 28
) -> tuple[list[list[str]], list[list[str]]]:
    """Per latent, the top_n tokens whose finetuned logit W_U · (γ ⊙ d_i) is most increased / decreased.

    γ is the final norm's gain (see `_final_norm_gain`); d_i = W_dec_FD[i] / scale. Latents are processed
    in chunks so that at most `chunk_elems` logits [chunk, V] exist at once (never F × V). Token strings come
    from `tokenizer.decode([id])`, decoded once per distinct id.
    """
    W_U_VD = finetuned.get_output_embeddings().weight.detach()
    device = W_U_VD.device
    V, D = W_U_VD.shape
    W_U_VD = W_U_VD.float()
    gain_D = _final_norm_gain(finetuned, D, device)  # [D]
    scale = sae.scale.detach().float().to(device)
    W_dec_FD = sae.W_dec_FD.detach()
    F = W_dec_FD.shape[0]
    k = min(top_n, V)
    chunk = max(1, chunk_elems // V)
    top_FK, bot_FK = [], []
    with torch.no_grad():
        for f0 in range(0, F, chunk):
            d_cD = W_dec_FD[f0 : f0 + chunk].float().to(device) / scale  # [c, D]
            logits_cV = (d_cD * gain_D) @ W_U_VD.T  # [c, V]
            top_FK.append(logits_cV.topk(k, dim=-1).indices.cpu())  # [c, k]
            bot_FK.append((-logits_cV).topk(k, dim=-1).indices.cpu())  # [c, k]
    top_ids = torch.cat(top_FK).numpy()  # [F, k]
    bot_ids = torch.cat(bot_FK).numpy()  # [F, k]
    vocab = {int(i): tokenizer.decode([int(i)]) for i in np.unique(np.concatenate([top_ids, bot_ids]))}
    promoted = [[vocab[int(i)] for i in row] for row in top_ids]
    suppressed = [[vocab[int(i)] for i in row] for row in bot_ids]
    return promoted, suppressed


class LatentDocStats(NamedTuple):
    """Per (latent, document) where the latent fires: the `latent_docs` table's columns, sorted by (latent, doc)."""

    latent_id: np.ndarray  # [G] int32
    doc_id: np.ndarray  # [G] int64
    n_tokens: np.ndarray  # [G] int32: firing tokens
    act_sum: np.ndarray  # [G] float64: sum of activations
    act_max: np.ndarray  # [G] float32
    attr_sum: np.ndarray  # [G] float64: S_d, the latent's KL attribution summed over the document
    attr_max: np.ndarray  # [G] float32: largest attribution on one token


def latent_doc_stats(
    doc_id_N: np.ndarray, latent_id_N: np.ndarray, activation_N: np.ndarray, attribution_N: np.ndarray
) -> LatentDocStats:
    """Aggregate attribution records (one per active (token, latent)) per (latent, document).

    Exact for the whole run when every document's records are in one call (the attribution stage calls it once
    per batch of whole documents). The ranking SQL reads this table instead of re-aggregating latent_tokens."""
    order_N = np.lexsort((doc_id_N, latent_id_N))  # by latent, then document
    lat_N, doc_N = latent_id_N[order_N], doc_id_N[order_N]
    new_N = np.ones(len(order_N), bool)
    new_N[1:] = (lat_N[1:] != lat_N[:-1]) | (doc_N[1:] != doc_N[:-1])
    start_G = np.flatnonzero(new_N)  # empty input: empty groups (reduceat accepts empty indices)
    act_N = activation_N[order_N]
    attr_N = attribution_N[order_N]
    return LatentDocStats(
        latent_id=lat_N[start_G].astype(np.int32),
        doc_id=doc_N[start_G].astype(np.int64),
        n_tokens=np.diff(np.append(start_G, len(order_N))).astype(np.int32),
        act_sum=np.add.reduceat(act_N.astype(np.float64), start_G),
        act_max=np.maximum.reduceat(act_N, start_G).astype(np.float32),
        attr_sum=np.add.reduceat(attr_N.astype(np.float64), start_G),
        attr_max=np.maximum.reduceat(attr_N, start_G).astype(np.float32),
    )
