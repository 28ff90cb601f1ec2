"""Tests of diffsae.kl and diffsae.attribution on tiny random Llama pairs (CPU, a few seconds).

The pair: a random `LlamaForCausalLM` (vocab 64, d 16, 3 layers) and a copy with perturbed weights above the
embedding. The SAE is a stand-in with the `BatchTopKSAE` interface (encode, decode, W_dec_FD, b_dec_D,
scale); when `diffsae.sae` exists the main checks also run against a randomly initialised `BatchTopKSAE`.

    pytest tests/test_attribution.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from diffsae.attribution import AttributionBatch, attribute_batch, promoted_suppressed
from diffsae.hooks import read_residual, replace_residual
from diffsae.kl import kl_grad_logits_q, kl_per_token

torch.set_num_threads(2)
LAYER, D, V, F = 1, 16, 64, 48


class StandInSAE(nn.Module):
    """Random SAE with the BatchTopKSAE interface: per-token top-k above a threshold, scaled units."""

    def __init__(self, seed: int = 0, k: int = 6, scale: float = 0.7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_dec_FD = nn.Parameter(torch.randn(F, D, generator=g) / math.sqrt(D))
        self.W_enc_DF = nn.Parameter(self.W_dec_FD.detach().T.clone())
        self.b_enc_F = nn.Parameter(0.05 * torch.randn(F, generator=g))
        self.b_dec_D = nn.Parameter(0.1 * torch.randn(D, generator=g))
        self.register_buffer("scale", torch.tensor(scale))
        self.register_buffer("threshold", torch.tensor(0.02))
        self.k = k

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = torch.relu((x_BD * self.scale - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)  # [B, F]
        top_BF = torch.zeros_like(pre_BF).scatter(1, pre_BF.topk(self.k, dim=1).indices, 1.0)  # [B, F]
        return pre_BF * top_BF * (pre_BF > self.threshold)  # [B, F]

    def decode(self, acts_BF: torch.Tensor) -> torch.Tensor:
        return (acts_BF @ self.W_dec_FD + self.b_dec_D) / self.scale  # [B, D]


def make_pair(seed: int = 0, **config: object) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random 3-block Llama and a copy with its blocks perturbed (`config`: LlamaConfig overrides)."""
    cfg = LlamaConfig(**{
        "vocab_size": V, "hidden_size": D, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.3,
        "tie_word_embeddings": False, **config,
    })  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers." in name and "norm" not in name:
                p.add_(0.15 * torch.randn(p.shape, generator=g))
    return base, ft


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return make_pair()


@pytest.fixture(scope="module")
def sae() -> StandInSAE:
    return StandInSAE()


LENGTHS = (10, 6, 8)


def right_padded(lengths: tuple[int, ...] = LENGTHS, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids_BT = torch.zeros(len(lengths), T, dtype=torch.long)
    mask_BT = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids_BT[b, :n] = torch.randint(1, V, (n,), generator=g)
        mask_BT[b, :n] = 1
    return ids_BT, mask_BT


def records(res: AttributionBatch, b: int) -> dict[tuple[int, int], tuple[float, float]]:
    sel = res.batch_idx == b
    return {
        (int(p), int(i)): (float(a), float(x))
        for p, i, a, x in zip(res.pos[sel], res.latent_id[sel], res.activation[sel], res.attribution[sel])
    }


def completeness_errors(res: AttributionBatch) -> np.ndarray:
    return np.abs(res.attr_sum_B - res.kl_drop_B) / np.maximum(np.abs(res.kl_drop_B), 1e-6)


# ---------------------------------------------------------------- KL


def test_kl_matches_hand_computed() -> None:
    p = [0.5, 0.25, 0.25]
    q = [0.2, 0.3, 0.5]
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logits_p = torch.tensor(p).log().view(1, 1, 3) + 3.0  # shifts do not change the distribution
    logits_q = torch.tensor(q).log().view(1, 1, 3) - 1.0
    got = kl_per_token(logits_p, logits_q)
    assert got.shape == (1, 1) and got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert kl_per_token(logits_p, logits_p).item() == pytest.approx(0.0, abs=1e-7)
    # p = 0 entries contribute 0, not NaN; bfloat16 logits are promoted to float32.
    inf_p = torch.tensor([[[0.0, -math.inf, 0.0]]])
    assert kl_per_token(inf_p, torch.zeros(1, 1, 3)).item() == pytest.approx(math.log(1.5), rel=1e-6)
    assert kl_per_token(logits_p.bfloat16(), logits_q.bfloat16()).dtype == torch.float32


def test_kl_chunked_equals_unchunked_and_broadcasts() -> None:
    g = torch.Generator().manual_seed(0)
    a_BTV, b_BTV = torch.randn(2, 7, 11, generator=g) * 3, torch.randn(2, 7, 11, generator=g) * 3
    full = kl_per_token(a_BTV, b_BTV)
    assert torch.allclose(kl_per_token(a_BTV, b_BTV, chunk_elems=1), full, atol=1e-6)
    assert torch.allclose(kl_per_token(a_BTV, b_BTV, chunk_elems=50), full, atol=1e-6)
    stacked = kl_per_token(a_BTV[None], torch.stack([b_BTV, a_BTV]), chunk_elems=30)  # [2, 2, 7]
    assert torch.allclose(stacked[0], full, atol=1e-6) and stacked[1].abs().max() < 1e-6
    assert (full > 0).all()


def test_kl_grad_closed_form_matches_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    p_BTV = torch.randn(1, 2, 5, 9, generator=g) * 2
    q_BTV = (torch.randn(3, 2, 5, 9, generator=g) * 2).requires_grad_(True)
    w_BT = (torch.rand(1, 2, 5, generator=g) > 0.3).float()
    (want,) = torch.autograd.grad((kl_per_token(p_BTV, q_BTV) * w_BT).sum(), q_BTV)
    for chunk in (1, 40, 1 << 20):
        got = kl_grad_logits_q(p_BTV, q_BTV.detach(), w_BT.bool(), chunk_elems=chunk)
        assert got.shape == q_BTV.shape and torch.allclose(got, want, atol=1e-6)
    assert want.abs().max() > 1e-2


# ---------------------------------------------------------------- attribution


def test_completeness_per_document(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, skip_first=1)
    assert res.kl_drop_B.shape == (3,) and (np.abs(res.kl_drop_B) > 1e-3).all()
    # kl_drop_B is the sum of the per-token endpoints over the analysed tokens
    for b, n in enumerate(LENGTHS):
        drop = res.kl_patch_bias_BT[b, 1:n].sum() - res.kl_patch_recon_BT[b, 1:n].sum()
        assert drop == pytest.approx(res.kl_drop_B[b], rel=1e-5, abs=1e-7)
        assert records(res, b) and sum(x for _, x in records(res, b).values()) == pytest.approx(
            res.attr_sum_B[b], rel=1e-4, abs=1e-7
        )
    err = completeness_errors(res)
    assert (err < 0.01).all(), err
    # a single Riemann step is a much cruder approximation: the test can tell the difference
    coarse = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=1)
    assert completeness_errors(coarse).max() > err.max()


def test_padding_is_nan_and_never_reported(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4)
    pad = ~mask_BT.bool().numpy()
    for arr in (res.kl_BT, res.kl_patch_base_BT, res.kl_patch_bias_BT, res.kl_patch_recon_BT):
        assert arr.dtype == np.float32 and np.isnan(arr[pad]).all() and np.isfinite(arr[~pad]).all()
    for b, n in enumerate(LENGTHS):
        assert res.pos[res.batch_idx == b].max() < n


def _direct_forward(ft, h_BTD, ids_BT):
    with torch.no_grad(), replace_residual(ft, LAYER, h_BTD):
        return ft(ids_BT).logits


def test_patched_kls_match_direct_forwards(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded(lengths=(9,))
    with torch.no_grad():
        with read_residual(base, LAYER) as cb:
            base(ids_BT)
        with read_residual(ft, LAYER) as cf:
            logits_ft = ft(ids_BT).logits
    h_base, h_ft = cb.value[0], cf.value[0]  # [T, D]
    # patching h_ft itself reproduces the finetuned logits
    assert kl_per_token(logits_ft, _direct_forward(ft, h_ft[None], ids_BT)).abs().max() < 1e-6
    with torch.no_grad():
        acts_TF = sae.encode(h_ft - h_base)
        recon_TD, bias_TD = sae.decode(acts_TF), sae.decode(torch.zeros_like(acts_TF))
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=2, skip_first=1)
    for arr, h_TD in (
        (res.kl_patch_base_BT, h_base),
        (res.kl_patch_bias_BT, h_base + bias_TD),
        (res.kl_patch_recon_BT, h_base + recon_TD),
    ):
        h_TD = torch.cat([h_ft[:1], h_TD[1:]])  # position 0 (skip_first) keeps h_ft
        want = kl_per_token(logits_ft, _direct_forward(ft, h_TD[None], ids_BT))[0].numpy()
        assert np.allclose(arr[0], want, rtol=1e-4, atol=1e-6)
        assert want[1:].max() > 1e-3
    want_kl = kl_per_token(logits_ft, base(ids_BT).logits.detach())[0].numpy()
    assert np.allclose(res.kl_BT[0], want_kl, rtol=1e-4, atol=1e-7)


def test_batched_equals_unbatched(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=8, steps_per_forward=3)
    for b, n in enumerate(LENGTHS):
        one = attribute_batch(base, ft, LAYER, ids_BT[b : b + 1, :n], mask_BT[b : b + 1, :n], sae, steps=8)
        for name in ("kl_BT", "kl_patch_base_BT", "kl_patch_bias_BT", "kl_patch_recon_BT"):
            assert np.allclose(getattr(res, name)[b, :n], getattr(one, name)[0], rtol=1e-4, atol=1e-7), name
        got, want = records(res, b), records(one, 0)
        assert got.keys() == want.keys()
        for key, (a, x) in want.items():
            assert got[key][0] == pytest.approx(a, rel=1e-4, abs=1e-6)
            assert got[key][1] == pytest.approx(x, rel=1e-3, abs=1e-6)


def test_left_padding_equals_right_padding(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    left_ids, left_mask = torch.zeros_like(ids_BT), torch.zeros_like(mask_BT)
    T = ids_BT.shape[1]
    for b, n in enumerate(LENGTHS):
        left_ids[b, T - n :], left_mask[b, T - n :] = ids_BT[b, :n], 1
    right = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4)
    left = attribute_batch(base, ft, LAYER, left_ids, left_mask, sae, steps=4)
    for b, n in enumerate(LENGTHS):
        assert np.allclose(left.kl_patch_recon_BT[b, T - n :], right.kl_patch_recon_BT[b, :n], atol=1e-5)
        got, want = records(left, b), records(right, b)
        assert got.keys() == want.keys()
        assert np.allclose([got[k][1] for k in want], [v[1] for v in want.values()], rtol=1e-3, atol=1e-6)


def naive_ig(base, ft, ids_1T, sae, steps: int, skip_first: int) -> dict[tuple[int, int], float]:
    """IG over the SAE activations themselves: x(α) = α·a, h = h_base + decode(x), explicit α loop."""
    with torch.no_grad():
        with read_residual(base, LAYER) as cb:
            base(ids_1T)
        with read_residual(ft, LAYER) as cf:
            logits_ft = ft(ids_1T).logits
        acts_TF = sae.encode(cf.value[0] - cb.value[0])
    acts_TF[:skip_first] = 0
    grad_TF = torch.zeros_like(acts_TF)
    for j in range(steps):
        x_TF = ((j + 0.5) / steps * acts_TF).requires_grad_(True)
        h_TD = cb.value[0] + sae.decode(x_TF)
        h_TD = torch.cat([cf.value[0, :skip_first], h_TD[skip_first:]])
        with replace_residual(ft, LAYER, h_TD[None]):
            kl = kl_per_token(logits_ft, ft(ids_1T).logits)[0, skip_first:].sum()
        (g_TF,) = torch.autograd.grad(kl, x_TF)
        grad_TF += g_TF / steps
    attr_TF = -acts_TF * grad_TF
    return {(int(t), int(i)): float(attr_TF[t, i]) for t, i in zip(*acts_TF.nonzero(as_tuple=True))}


def test_matches_naive_integrated_gradients(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded(lengths=(9, 5))
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=6, steps_per_forward=4)
    want = naive_ig(base, ft, ids_BT[:1], sae, steps=6, skip_first=1)
    got = records(res, 0)
    assert got.keys() == want.keys() and len(want) > 10
    keys = sorted(want)
    assert np.allclose([got[k][1] for k in keys], [want[k] for k in keys], rtol=1e-3, atol=1e-6)
    assert max(abs(v) for v in want.values()) > 1e-3


def test_skip_first_positions_unpatched_and_unreported(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, skip_first=2)
    assert res.pos.min() == 2
    for arr in (res.kl_patch_base_BT, res.kl_patch_bias_BT, res.kl_patch_recon_BT):
        assert np.abs(arr[:, :2]).max() < 1e-6  # unpatched: the finetuned distribution itself
    assert res.kl_BT[:, :2].min() > 1e-4  # the plain KL is still reported there
    every = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, skip_first=0)
    assert every.pos.min() == 0 and np.abs(every.kl_patch_base_BT[:, 0]).max() > 1e-4
    assert (completeness_errors(res) < 0.01).all() and (completeness_errors(every) < 0.01).all()


def test_params_untouched(pair, sae) -> None:
    base, ft = pair
    ft.train()
    ids_BT, mask_BT = right_padded()
    attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=2)
    assert ft.training and all(p.requires_grad and p.grad is None for p in ft.parameters())
    ft.eval()


def test_real_batch_topk_sae_when_present(pair) -> None:
    sae_mod = pytest.importorskip("diffsae.sae")
    real = sae_mod.BatchTopKSAE(d_in=D, n_latents=F, k=4, seed=0)
    with torch.no_grad():  # untrained: non-trivial bias, scale and threshold to exercise the units
        real.b_dec_D.copy_(0.1 * torch.randn(D, generator=torch.Generator().manual_seed(0)))
        real.scale.fill_(0.7)
        real.threshold.fill_(0.2)
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    # An untrained SAE fires ~20 latents per token and its path KL(α) is far from monotone (doc 1: KL falls
    # by 1.0 then rises by 0.8, net 0.19), so the midpoint rule needs 32 steps for 1 % (16 steps: 1.9 %).
    res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, real, steps=32)
    assert len(res.latent_id) > 0 and (completeness_errors(res) < 0.01).all()
    want = naive_ig(base, ft, ids_BT[:1, : LENGTHS[0]], real, steps=32, skip_first=1)
    got = records(res, 0)
    assert got.keys() == want.keys()
    keys = sorted(want)
    assert np.allclose([got[k][1] for k in keys], [want[k] for k in keys], rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- promoted / suppressed


class IdTokenizer:
    def decode(self, ids: list[int]) -> str:
        return f"t{ids[0]}"


def test_promoted_suppressed_hand_made() -> None:
    _, ft = make_pair(seed=5)
    sae = StandInSAE(seed=1, scale=2.0)
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(V, generator=g)  # token order[-1] gets the largest logit along coordinate 3
    with torch.no_grad():
        ft.lm_head.weight.normal_(0, 0.01, generator=g)
        ft.lm_head.weight[order, 3] = torch.linspace(-1, 1, V)
        sae.W_dec_FD.zero_()
        sae.W_dec_FD[0, 3] = 1.0  # latent 0 = +e_3, latent 1 = −e_3
        sae.W_dec_FD[1, 3] = -1.0
        ft.model.norm.weight.fill_(1.0)
    top, bottom = [int(i) for i in order[-3:].flip(0)], [int(i) for i in order[:3]]
    promoted, suppressed = promoted_suppressed(sae, ft, IdTokenizer(), top_n=3)
    assert len(promoted) == F and len(suppressed) == F and all(len(x) == 3 for x in promoted)
    assert promoted[0] == [f"t{i}" for i in top] and suppressed[0] == [f"t{i}" for i in bottom]
    assert promoted[1] == suppressed[0] and suppressed[1] == promoted[0]
    # the final norm's gain is applied: a negative gain on coordinate 3 swaps promoted and suppressed
    with torch.no_grad():
        ft.model.norm.weight[3] = -2.0
    flipped, _ = promoted_suppressed(sae, ft, IdTokenizer(), top_n=3, chunk_elems=V)  # one latent per chunk
    assert flipped[0] == suppressed[0] and flipped[1] == promoted[0]
