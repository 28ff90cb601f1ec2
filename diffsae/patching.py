"""The patched forward passes of the finetuned model: h_ft at layer L replaced by h_base, by h_base + b_dec, or by
h_base + the SAE reconstruction of diff = h_ft − h_base (original units), and the KL of each to p_ft.

Why: they give the per-token KL columns of the analysis (kl_patch_base / kl_patch_bias / kl_patch_recon), the
starting point and direction of the integrated-gradients path of diffsae/attribution.py, and the SAE's KL gap
recovered, 1 − Σ KL(p_ft ‖ p_patch(h_base + d̂)) / Σ KL(p_ft ‖ p_patch(h_base)) — forward passes only.
Positions < skip_first and padding keep h_ft (see diffsae/attribution.py, Conventions).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Literal, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from diffsae.data import Doc
from diffsae.extract import States, pad_batch, plan_batches
from diffsae.head import check_head, final_hidden, kl_from_hidden
from diffsae.hooks import read_residual, residual_at, run_from

PAIR_CHUNK = 1 << 16  # active (token, latent) pairs per gather chunk
Precision = Literal["float32", "bfloat16"]  # matmul precision of the attribution's gradient passes


class SAELike(Protocol):
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    scale: torch.Tensor

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor: ...


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False on every parameter; both restored on exit."""
    saved = [(m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models]
    try:
        for m in models:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        yield
    finally:
        for m, (training, flags) in zip(models, saved):
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, precision: Precision) -> ContextManager[object]:
    """bfloat16: torch.autocast on `device` (linear layers and attention in bfloat16, each block's output added to
    the float32 residual stream); float32: nothing changes."""
    if precision == "float32":
        return nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (CUDA with bf16 support; a CPU with AVX512-BF16 or
    AMX tiles): where it does not, emulated bfloat16 can be slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def _forward(model: nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
    """The final hidden state x [B, T, D] (the head's input: logits are made from it in chunks, diffsae.head)."""
    return final_hidden(model, input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT)


def patched_hidden(
    model: nn.Module,
    layer: int,
    h_BTD: torch.Tensor,
    ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    pos_BT: torch.Tensor,
) -> torch.Tensor:
    """The finetuned model's final hidden state [B, T, D] with the output of block `layer` replaced by `h_BTD`;
    only the blocks above `layer` run (diffsae.hooks.run_from: the lower blocks' output is replaced anyway)."""
    check_head(model)  # its once-per-model unpatched check must not run inside run_from
    with run_from(model, layer, h_BTD):
        return _forward(model, ids_BT, mask_BT, pos_BT)  # [B, T, D]


def _sum_rows(rows_PD: torch.Tensor, idx_P: torch.Tensor, n: int) -> torch.Tensor:
    out_ND = torch.zeros(n, rows_PD.shape[1], dtype=rows_PD.dtype, device=rows_PD.device)
    return out_ND.index_add_(0, idx_P, rows_PD)  # [N, D]


def nan_outside(x_BT: torch.Tensor, keep_BT: torch.Tensor) -> np.ndarray:
    return torch.where(keep_BT, x_BT.float(), torch.nan).cpu().numpy().astype(np.float32)


class PatchedRuns(NamedTuple):
    """What the forward-only part of the attribution computes for a batch (all on the finetuned model's device)."""

    mask_BT: torch.Tensor  # bool, real tokens
    analysed_BT: torch.Tensor  # bool, patched and scored tokens
    docpos_BT: torch.Tensor  # in-document positions
    kl_BT: torch.Tensor  # KL(p_ft ‖ p_base)
    per_token: dict[str, torch.Tensor]  # base / bias / recon: KL(p_ft ‖ p_patch) per token
    x_ft_BTD: torch.Tensor  # the finetuned model's final hidden state (its logits: diffsae.head.head_logits)
    h_ft_BTD: torch.Tensor
    start_BTD: torch.Tensor  # h(0): h_base + b at analysed tokens, h_ft elsewhere
    delta_BTD: torch.Tensor  # dh/dα: the reconstruction at analysed tokens, 0 elsewhere
    tok_P: torch.Tensor  # active (token, latent) pairs: analysed-token index, latent, activation
    lat_P: torch.Tensor
    act_P: torch.Tensor


def patched_runs(
    base: nn.Module, finetuned: nn.Module, layer: int, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
    sae: SAELike, skip_first: int, kl_BT: torch.Tensor | None = None, states: States | None = None,
) -> PatchedRuns:  # fmt: skip
    """Both models, the SAE encoding of the diff and the three patched runs (h_base, h_base + b, h_base + recon),
    without gradients. Call inside `frozen(base, finetuned)`.

    kl_BT: KL(p_ft ‖ p_base) per token when already known (extraction stores it): the base model then runs only up
    to block `layer` (`diffsae.hooks.residual_at`), its upper blocks and head are never computed.
    states: the unpatched runs' residuals and final hidden state when extraction stored them (needs kl_BT): no
    unpatched forward runs at all, only the patched passes."""
    if states is not None and kl_BT is None:
        raise ValueError("states need extraction's kl_BT too")
    device = model_device(finetuned)
    ids_BT = input_ids_BT.to(device)
    mask_BT = attention_mask_BT.to(device).bool()
    docpos_BT = (mask_BT.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T] in-document position
    analysed_BT = mask_BT & (docpos_BT >= skip_first)  # [B, T] patched, scored, reported
    mask_long_BT = mask_BT.long()

    W_dec_FD = sae.W_dec_FD.detach()
    sae_device = W_dec_FD.device
    scale = sae.scale.detach().float().to(device)  # scalar or [D]
    b_D = sae.b_dec_D.detach().float().to(device) / scale  # [D] bias in original units

    with torch.no_grad():
        if states is None:
            states, kl_BT = _unpatched(base, finetuned, layer, ids_BT, mask_long_BT, docpos_BT, kl_BT)
        h_base_BTD, h_ft_BTD = (t.to(device, torch.float32) for t in states[:2])
        x_ft_BTD = states.x_ft_BTD.to(device, next(finetuned.parameters()).dtype)  # as the patched runs' x
        kl_BT = kl_BT.to(device).float()

        # SAE activations of the diff at the analysed tokens, as sparse (token, latent, activation) pairs.
        diff_ND = (h_ft_BTD - h_base_BTD)[analysed_BT]  # [N, D], N = analysed tokens
        N, D = diff_ND.shape
        if hasattr(sae, "encode_pair"):  # a dictionary that reads both residuals (diffsae.crosscoder.DiffView)
            pair_NMD = torch.stack([h_base_BTD[analysed_BT], h_ft_BTD[analysed_BT]], dim=1).to(sae_device)
            acts_NF = sae.encode_pair(pair_NMD).float()
        else:
            acts_NF = sae.encode(diff_ND.to(sae_device, W_dec_FD.dtype)).float()
        tok_P, lat_P = acts_NF.nonzero(as_tuple=True)  # [P], [P]
        act_P = acts_NF[tok_P, lat_P]  # [P]
        del acts_NF
        tok_P, lat_P, act_P = tok_P.to(device), lat_P.to(device), act_P.to(device)

        # Σ_i a_i d_i per token, from the active W_dec rows (d_i = W_dec_FD[i] / scale).
        recon_ND = torch.zeros(N, D, device=device)
        for p0 in range(0, tok_P.numel(), PAIR_CHUNK):
            sl = slice(p0, p0 + PAIR_CHUNK)
            rows_PD = W_dec_FD[lat_P[sl].to(sae_device)].float().to(device) / scale  # [p, D]
            recon_ND += _sum_rows(act_P[sl, None] * rows_PD, tok_P[sl], N)  # [N, D]

        start_BTD = h_ft_BTD.clone()  # h(0) = h_base + b at analysed tokens, h_ft elsewhere
        start_BTD[analysed_BT] = h_base_BTD[analysed_BT] + b_D
        delta_BTD = torch.zeros_like(h_ft_BTD)  # dh/dα
        delta_BTD[analysed_BT] = recon_ND
        patch_base_BTD = h_ft_BTD.clone()
        patch_base_BTD[analysed_BT] = h_base_BTD[analysed_BT]
        del h_base_BTD, diff_ND, recon_ND

        # The three patched runs' final hidden states, then their KLs in one chunked pass (p_ft's logits made once).
        names = ("base", "bias", "recon")
        x_SBTD = torch.stack([
            patched_hidden(finetuned, layer, h_BTD, ids_BT, mask_long_BT, docpos_BT)
            for h_BTD in (patch_base_BTD, start_BTD, start_BTD + delta_BTD)
        ])  # fmt: skip
        kl_SBT = kl_from_hidden(finetuned, x_ft_BTD[None], finetuned, x_SBTD)  # [3, B, T]
        per_token = {name: kl_SBT[i] for i, name in enumerate(names)}
        del patch_base_BTD, x_SBTD
    return PatchedRuns(
        mask_BT, analysed_BT, docpos_BT, kl_BT, per_token, x_ft_BTD, h_ft_BTD, start_BTD, delta_BTD,
        tok_P, lat_P, act_P,
    )  # fmt: skip


def _unpatched(
    base: nn.Module, finetuned: nn.Module, layer: int, ids_BT: torch.Tensor, mask_BT: torch.Tensor,
    docpos_BT: torch.Tensor, kl_BT: torch.Tensor | None,
) -> tuple[States, torch.Tensor]:  # fmt: skip
    """The unpatched runs (the finetuned model whole, the base whole or only up to `layer` when kl_BT is known):
    their States and KL(p_ft ‖ p_base) per token, on the finetuned model's device."""
    device = model_device(finetuned)
    with read_residual(finetuned, layer) as cap_ft:
        x_ft_BTD = _forward(finetuned, ids_BT, mask_BT, docpos_BT)
    if kl_BT is None:
        with read_residual(base, layer) as cap_base:
            x_base_BTD = _forward(base, ids_BT, mask_BT, docpos_BT)
        kl_BT = kl_from_hidden(finetuned, x_ft_BTD, base, x_base_BTD.to(device))
        h_base_BTD = cap_base.value
        del x_base_BTD
    else:
        dev_b = model_device(base)
        h_base_BTD = residual_at(
            base, layer, input_ids=ids_BT.to(dev_b), attention_mask=mask_BT.to(dev_b), position_ids=docpos_BT.to(dev_b)
        )
    return States(h_base_BTD.float().to(device), cap_ft.value.float(), x_ft_BTD), kl_BT


class PatchedKL(NamedTuple):
    """Per-token float32 [B, T] numpy, NaN at padding (the first four fields of AttributionBatch)."""

    kl_BT: np.ndarray
    kl_patch_base_BT: np.ndarray
    kl_patch_bias_BT: np.ndarray
    kl_patch_recon_BT: np.ndarray


def patched_kl(
    base: nn.Module, finetuned: nn.Module, layer: int, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
    sae: SAELike, skip_first: int = 1,
) -> PatchedKL:  # fmt: skip
    """KL(p_ft ‖ p_base) and KL(p_ft ‖ p_patch) of the three patched runs, forward passes only (no gradient):
    what the KL-gap-recovered metric needs; identical to those fields of `attribute_batch`."""
    with frozen(base, finetuned):
        r = patched_runs(base, finetuned, layer, input_ids_BT, attention_mask_BT, sae, skip_first)
    return PatchedKL(
        nan_outside(r.kl_BT, r.mask_BT),
        *(nan_outside(r.per_token[name], r.mask_BT) for name in ("base", "bias", "recon")),
    )


def kl_gap_recovered(
    base: nn.Module, finetuned: nn.Module, layer: int, sae: SAELike, docs: Sequence[Doc], pad_id: int,
    batch_tokens: int = 2048, skip_first: int = 1,
) -> float:  # fmt: skip
    """1 − Σ KL(p_ft‖p_patch(h_base + d̂)) / Σ KL(p_ft‖p_patch(h_base)) over the docs' analysed tokens."""
    num = den = 0.0
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        ids_BT, mask_BT = pad_batch([docs[i] for i in idx], pad_id, model_device(finetuned))
        out = patched_kl(base, finetuned, layer, ids_BT, mask_BT, sae, skip_first)
        num += float(np.nansum(out.kl_patch_recon_BT))
        den += float(np.nansum(out.kl_patch_base_BT))
    return 1.0 - num / den if den > 0 else float("nan")
