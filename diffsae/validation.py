"""Causal validation of diff-SAE latents: ablate a latent from the finetuned model, add it to the base model.

Why: a high KL attribution says a latent *accounts for* part of KL(p_ft ‖ p_base); intervening on it says whether
it *causes* it. Two interventions on the residual stream at the output of decoder block L (`diffsae.hooks`):

- **Ablation** (finetuned model). With diff = h_ft − h_base at a token and a_i the SAE's activation of latent i
  there (`sae.encode`, scaled units), d_i = W_dec_FD[i] / scale (original units, as `sae.decode`):

      h_ft ← h_ft − Σ_{i ∈ group} a_i d_i        (only where a_i > 0, i.e. where the latent fires)

  Ablating every active latent gives h_base + b + (diff − d̂) (b = b_dec_D / scale, d̂ = sae.decode(sae.encode(
  diff))): the attribution stage's "bias" patch (diffsae/patching.py) plus the SAE's reconstruction error.
  The base model runs alongside on the same tokens to give h_base, with its own KV cache during generation.
  h_ft at layer L never depends on an earlier ablation (blocks ≤ L read only unedited residuals), so the
  encoding per step equals the encoding of the whole sequence (tests/test_validation.py checks it).
- **Steering** (base model): h_base ← h_base + s · Σ_i ā_i d_i on every token (prompt and generated), ā_i the
  latent's typical activation (the stage uses a high quantile of its activations over latent_tokens).

Measured (`validate_latent`): (a) the fraction of KL(p_ft ‖ p_base) the ablation removes on the latent's firing
tokens and on the other analysed tokens of its top documents, 1 − Σ KL(p_ft_abl ‖ p_base) / Σ KL(p_ft ‖ p_base);
(b) greedy generations on prompts, finetuned vs finetuned-ablated; (c) greedy generations of the base steered at
each scale of a sweep. The kept scale is the strongest **coherent** one (`choose_scale`). Coherence is measured,
with no language-model judge, by the pair's own unsteered models: a generation's NLL is min(mean per-token NLL
under the unsteered base, the same under the finetuned model) -- text at least one of them finds plausible (a
steered base that starts doing what the finetune does is plausible to the finetune; gibberish and degenerate
repetition are plausible to neither); a scale is coherent while the mean of that over its prompts is at most the
unsteered base answers' own (scale 0) + `margin` nats. Positions < skip_first (the BOS sink, never SAE data) and
padding are never edited.

References: feature ablation and clamping/steering with SAE decoder directions as in Templeton et al. 2024
("Scaling Monosemanticity", Anthropic) and Marks et al. 2024 ("Sparse Feature Circuits", arXiv:2403.19647);
adding a direction to the residual stream on every token as in Turner et al. 2023 ("Activation Addition",
arXiv:2308.10248); the latents are those of a diff-SAE ranked by KL attribution (diffsae/attribution.py).

Conventions follow diffsae/attribution.py (in-document positions from the mask, float32 KL, natural log).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from diffsae.extract import plan_batches
from diffsae.head import final_hidden, kl_from_hidden
from diffsae.hooks import read_residual, replace_residual
from diffsae.methods import encode_tokens
from diffsae.patching import SAELike, frozen, model_device

# edit(h_BTD, h_partner_BTD or None, keep_BT) -> new h_BTD: an intervention on the residual at layer L.
Edit = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def decoder_rows(sae: SAELike, latent_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """d_i = W_dec_FD[i] / scale for each latent of the group: [K, D] float32, original units."""
    idx_K = torch.as_tensor(list(latent_ids), dtype=torch.long, device=sae.W_dec_FD.device)
    scale = sae.scale.detach().float().to(device)
    return sae.W_dec_FD.detach()[idx_K].float().to(device) / scale  # [K, D]


def group_acts(sae: SAELike, h_ft_ND: torch.Tensor, h_base_ND: torch.Tensor, latent_ids: Sequence[int]) -> torch.Tensor:
    """The group's activations [N, K] (scaled units) at tokens with residuals h_ft, h_base (original units): of the
    diff, or of both residuals for a dictionary that reads both (`diffsae.methods.encode_tokens`)."""
    acts_NF = encode_tokens(sae, h_ft_ND, h_base_ND).float()
    idx_K = torch.as_tensor(list(latent_ids), dtype=torch.long, device=acts_NF.device)
    return acts_NF[:, idx_K].to(h_ft_ND.device)  # [N, K]


def ablate(
    h_ft_BTD: torch.Tensor, h_base_BTD: torch.Tensor, sae: SAELike, latent_ids: Sequence[int], keep_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_ft − Σ_i a_i d_i at the `keep` tokens, the group's activations [B, T, K]); float32."""
    h_BTD, hb_BTD = h_ft_BTD.float(), h_base_BTD.float().to(h_ft_BTD.device)
    rows_KD = decoder_rows(sae, latent_ids, h_BTD.device)
    acts_BTK = torch.zeros(*h_BTD.shape[:2], rows_KD.shape[0], device=h_BTD.device)
    acts_BTK[keep_BT] = group_acts(sae, h_BTD[keep_BT], hb_BTD[keep_BT], latent_ids)
    return h_BTD - acts_BTK @ rows_KD, acts_BTK  # [B,T,K]@[K,D] -> [B,T,D]


def ablation_edit(sae: SAELike, latent_ids: Sequence[int], rows_B: torch.Tensor | None = None) -> Edit:
    """Ablation as an `Edit` (needs the base model as partner); `rows_B` (bool): only those batch rows."""

    def edit(h_BTD: torch.Tensor, h_base_BTD: torch.Tensor | None, keep_BT: torch.Tensor) -> torch.Tensor:
        assert h_base_BTD is not None, "ablation needs the base model's residual (partner)"
        keep = keep_BT if rows_B is None else keep_BT & rows_B[:, None].to(keep_BT.device)
        return ablate(h_BTD, h_base_BTD, sae, latent_ids, keep)[0]

    return edit


def steering_edit(vector_D: torch.Tensor, scale_B: torch.Tensor) -> Edit:
    """Steering as an `Edit`: h + scale_B[b] · vector_D at the `keep` tokens of row b."""

    def edit(h_BTD: torch.Tensor, _partner: torch.Tensor | None, keep_BT: torch.Tensor) -> torch.Tensor:
        add_BTD = scale_B.to(h_BTD.device)[:, None, None] * vector_D.to(h_BTD.device)[None, None, :]
        return h_BTD.float() + add_BTD * keep_BT[..., None]

    return edit


def steering_vector(sae: SAELike, latent_ids: Sequence[int], typical_acts: Sequence[float]) -> torch.Tensor:
    """Σ_i ā_i d_i [D], original units."""
    rows_KD = decoder_rows(sae, latent_ids, sae.W_dec_FD.device)
    return (torch.as_tensor(list(typical_acts), dtype=torch.float32, device=rows_KD.device)[:, None] * rows_KD).sum(0)


class AblationKL(NamedTuple):
    """Per-token float32 [B, T] numpy (0 outside `analysed_BT`) and the masks, for one batch of documents."""

    kl_BT: np.ndarray  # KL(p_ft ‖ p_base)
    kl_ablated_BT: np.ndarray  # KL(p_ft_ablated ‖ p_base)
    fires_BT: np.ndarray  # bool: analysed token where some latent of the group fires
    analysed_BT: np.ndarray  # bool: real token at in-document position >= skip_first


@torch.no_grad()
def ablation_kl(
    base: nn.Module, finetuned: nn.Module, layer: int, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
    sae: SAELike, latent_ids: Sequence[int], skip_first: int = 1,
) -> AblationKL:  # fmt: skip
    """Teacher-forced documents (right or left padded): KL to the base before and after the ablation."""
    device = model_device(finetuned)
    ids_BT, mask_BT = input_ids_BT.to(device), attention_mask_BT.to(device).bool()
    pos_BT = (mask_BT.long().cumsum(1) - 1).clamp(min=0)
    analysed_BT = mask_BT & (pos_BT >= skip_first)
    kw = {"input_ids": ids_BT, "attention_mask": mask_BT.long(), "position_ids": pos_BT}
    with frozen(base, finetuned):
        with read_residual(base, layer) as cap_b:
            x_base_BTD = final_hidden(base, **kw)
        with read_residual(finetuned, layer) as cap_f:
            x_ft_BTD = final_hidden(finetuned, **kw)
        h_abl_BTD, acts_BTK = ablate(cap_f.value, cap_b.value, sae, latent_ids, analysed_BT)
        with replace_residual(finetuned, layer, h_abl_BTD):
            x_abl_BTD = final_hidden(finetuned, **kw)
        kl_BT = kl_from_hidden(finetuned, x_ft_BTD, base, x_base_BTD) * analysed_BT
        kl_abl_BT = kl_from_hidden(finetuned, x_abl_BTD, base, x_base_BTD) * analysed_BT
    fires_BT = (acts_BTK > 0).any(-1) & analysed_BT
    return AblationKL(*(x.cpu().numpy() for x in (kl_BT, kl_abl_BT, fires_BT, analysed_BT)))


def kl_removed(kl_N: np.ndarray, kl_ablated_N: np.ndarray) -> float:
    """1 − Σ KL(p_ft_abl ‖ p_base) / Σ KL(p_ft ‖ p_base) over a token set (NaN when it holds no KL)."""
    den = float(np.sum(kl_N, dtype=np.float64))
    return 1.0 - float(np.sum(kl_ablated_N, dtype=np.float64)) / den if den > 0 else float("nan")


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids [B, T], mask [B, T] (long) and in-document positions [B, T]."""
    T = max(len(p) for p in prompts)
    ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask_BT[b, T - len(p) :] = 1
    pos_BT = (mask_BT.cumsum(1) - 1).clamp(min=0)
    return ids_BT.to(device), mask_BT.to(device), pos_BT.to(device)


def _new_cache(model: nn.Module) -> dict[str, object]:
    """{keyword: a fresh KV cache (updated in place)}; transformers 5.x calls it `cache`, earlier `past_key_values`."""
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    return {"cache" if "cache" in params else "past_key_values": cache}


@torch.no_grad()
def greedy_generate(
    model: nn.Module, layer: int, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
    pad_id: int, edit: Edit | None = None, partner: nn.Module | None = None, skip_first: int = 1,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations (each ends at its first eos token, included) of left-padded prompts, with `edit`
    applied to `model`'s residual at `layer` on every prompt and generated token (position >= skip_first).
    `partner` (the base model, for ablations) runs on the same tokens with its own KV cache; its residual at
    `layer` is the edit's second argument."""
    device = model_device(model)
    ids_BT, mask_BT, pos_BT = left_padded(prompts, pad_id, device)
    B = ids_BT.shape[0]
    eos_E = torch.as_tensor(list(eos_ids), dtype=torch.long, device=device)
    cache, cache_p = _new_cache(model), _new_cache(partner) if partner is not None else {}
    full_mask_BT, new_BT = mask_BT, mask_BT.bool()
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out_BN = []
    with frozen(*(m for m in (model, partner) if m is not None)):
        for _ in range(max_new_tokens):
            kw = {"input_ids": ids_BT, "attention_mask": full_mask_BT, "position_ids": pos_BT, "use_cache": True}
            h_p = None
            if partner is not None:
                with read_residual(partner, layer) as cap:
                    partner(**kw, **cache_p)
                h_p = cap.value
            keep_BT = new_BT & (pos_BT >= skip_first)
            ctx = replace_residual(model, layer, lambda h: edit(h, h_p, keep_BT)) if edit is not None else nullcontext()
            with ctx:
                o = model(**kw, **cache)
            next_B = torch.where(done_B, torch.full_like(done_B, pad_id, dtype=torch.long), o.logits[:, -1].argmax(-1))
            out_BN.append(next_B)
            done_B |= torch.isin(next_B, eos_E)
            if bool(done_B.all()):
                break
            ids_BT, pos_BT = next_B[:, None], pos_BT[:, -1:] + 1
            new_BT = torch.ones(B, 1, dtype=torch.bool, device=device)
            full_mask_BT = torch.cat([full_mask_BT, torch.ones(B, 1, dtype=torch.long, device=device)], 1)
    rows = torch.stack(out_BN, 1).tolist() if out_BN else [[] for _ in range(B)]
    eos = set(int(e) for e in eos_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@torch.no_grad()
def generation_nll(
    model: nn.Module, prompts: Sequence[Sequence[int]], gens: Sequence[Sequence[int]], pad_id: int, batch: int = 16
) -> np.ndarray:
    """Mean per-token NLL (nats) of each generation given its prompt under an unedited `model` [B] (NaN: empty)."""
    device = model_device(model)
    out = np.full(len(gens), np.nan)
    for b0 in range(0, len(gens), batch):
        seqs = [list(p) + list(g) for p, g in zip(prompts[b0 : b0 + batch], gens[b0 : b0 + batch])]
        ids_BT, mask_BT, pos_BT = left_padded(seqs, pad_id, device)
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits
        logp_BTV = torch.log_softmax(logits_BTV[:, :-1].float(), -1)
        nll_BT = -logp_BTV.gather(-1, ids_BT[:, 1:, None])[..., 0]  # [B, T-1]: token t+1 given tokens <= t
        T = ids_BT.shape[1]
        for b, g in enumerate(gens[b0 : b0 + batch]):
            if len(g):
                out[b0 + b] = float(nll_BT[b, T - 1 - len(g) :].mean())
    return out


def coherence_nll(
    base: nn.Module, finetuned: nn.Module, prompts: Sequence[Sequence[int]], gens: Sequence[Sequence[int]],
    pad_id: int, n_groups: int = 1,
) -> list[float]:  # fmt: skip
    """Per group of consecutive generations (e.g. one per steering scale): the mean over its generations of
    min(NLL under `base`, NLL under `finetuned`) (module docstring)."""
    nll_N = np.fmin(generation_nll(base, prompts, gens, pad_id), generation_nll(finetuned, prompts, gens, pad_id))
    size = len(gens) // n_groups
    return [_nanmean(nll_N[i * size : (i + 1) * size]) for i in range(n_groups)]


def choose_scale(scales: Sequence[float], nll_S: Sequence[float], reference: float, margin: float) -> int:
    """Index of the strongest scale whose mean NLL <= reference + margin (module docstring); 0 when none."""
    ok = [i for i, (s, n) in enumerate(zip(scales, nll_S)) if np.isfinite(n) and n <= reference + margin]
    return max(ok, key=lambda i: scales[i]) if ok else 0


class LatentValidation(NamedTuple):
    """One latent group's figures; generations are token ids (prompt excluded), one per prompt."""

    kl_removed_on_firing: float
    kl_removed_elsewhere: float
    n_firing_tokens: int
    finetuned: list[list[int]]
    ablated: list[list[int]]
    generations_changed: float  # fraction of prompts whose greedy answer changed under the ablation
    scales: list[float]  # sorted, starting with 0 (the unsteered base)
    steered: list[list[list[int]]]  # [scale][prompt]
    steering_nll: list[float]  # per scale: mean coherence NLL of its generations (`coherence_nll`)
    coherence_limit: float  # steering_nll[0] + margin
    best_scale_index: int
    steering_changed: float  # fraction of prompts whose base answer changed at the kept scale


def validate_latent(
    base: nn.Module, finetuned: nn.Module, layer: int, sae: SAELike, latent_ids: Sequence[int],
    typical_acts: Sequence[float], docs: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], *,
    pad_id: int, eos_ids: Sequence[int], max_new_tokens: int, scales: Sequence[float], margin: float,
    skip_first: int = 1, batch_tokens: int = 4096,
) -> LatentValidation:  # fmt: skip
    """Ablation KL on `docs` (token ids), ablated and steered greedy generations on `prompts` (module docstring)."""
    device = model_device(finetuned)
    sums = np.zeros(4)  # Σ KL and Σ ablated KL, on firing tokens then elsewhere
    n_firing = 0
    for idx in plan_batches([len(d) for d in docs], batch_tokens):
        ids_BT, mask_BT, _ = left_padded([docs[i] for i in idx], pad_id, device)
        r = ablation_kl(base, finetuned, layer, ids_BT, mask_BT, sae, latent_ids, skip_first)
        rest_BT = r.analysed_BT & ~r.fires_BT
        sums += [r.kl_BT[r.fires_BT].sum(), r.kl_ablated_BT[r.fires_BT].sum(), r.kl_BT[rest_BT].sum(),
                 r.kl_ablated_BT[rest_BT].sum()]  # fmt: skip
        n_firing += int(r.fires_BT.sum())
    kl_fire, kl_rest = kl_removed(sums[0:1], sums[1:2]), kl_removed(sums[2:3], sums[3:4])
    sweep = sorted({0.0, *(float(s) for s in scales)})
    P = len(prompts)
    if P == 0:
        nan = float("nan")
        return LatentValidation(kl_fire, kl_rest, n_firing, [], [], nan, sweep, [[] for _ in sweep],
                                [nan] * len(sweep), nan, 0, nan)  # fmt: skip
    gen = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, skip_first=skip_first)
    both = greedy_generate(finetuned, layer, [*prompts, *prompts], edit=ablation_edit(
        sae, latent_ids, torch.arange(2 * P) >= P), partner=base, **gen)  # fmt: skip
    ft, abl = both[:P], both[P:]
    vector_D = steering_vector(sae, latent_ids, typical_acts)
    scale_B = torch.tensor([s for s in sweep for _ in range(P)])
    steer = steering_edit(vector_D, scale_B)
    steered_flat = greedy_generate(base, layer, list(prompts) * len(sweep), edit=steer, **gen)
    steered = [steered_flat[i * P : (i + 1) * P] for i in range(len(sweep))]
    nll_S = coherence_nll(base, finetuned, list(prompts) * len(sweep), steered_flat, pad_id, len(sweep))
    best = choose_scale(sweep, nll_S, nll_S[0], margin)
    return LatentValidation(
        kl_removed_on_firing=kl_fire,
        kl_removed_elsewhere=kl_rest,
        n_firing_tokens=n_firing,
        finetuned=ft,
        ablated=abl,
        generations_changed=float(np.mean([a != b for a, b in zip(ft, abl)])),
        scales=sweep,
        steered=steered,
        steering_nll=nll_S,
        coherence_limit=nll_S[0] + margin,
        best_scale_index=best,
        steering_changed=float(np.mean([a != b for a, b in zip(steered[0], steered[best])])),
    )


def _nanmean(x_N: np.ndarray) -> float:
    return float(np.nanmean(x_N)) if np.isfinite(x_N).any() else float("nan")
