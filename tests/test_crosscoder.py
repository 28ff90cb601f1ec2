"""The BatchTopK crosscoder (diffsae/crosscoder.py): one training step against a naive per-token re-implementation,
Latent Scaling against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from diffsae.attribution import attribute_batch
from diffsae.crosscoder import (
    BASE,
    FT,
    CrossCoder,
    CrossCoderTrainer,
    DiffView,
    LatentScaling,
    calibrate_threshold,
    latent_scaling_ratios,
)
from diffsae.patching import frozen, patched_runs
from tests.test_attribution import LAYER, make_pair, right_padded
from tests.test_attribution import D as D_MODEL

D, F, K, B = 3, 6, 2, 4
LR, EPS = 1e-2, 1e-8


def naive_step(params: dict[str, torch.Tensor], scale_M: torch.Tensor, x_BMD: torch.Tensor, dead: set[int]) -> dict:
    """Loops over tokens, latents and models: the crosscoder's forward, BatchTopK, AuxK, loss, then one Adam step from
    fresh moments (the first step of Adam moves each parameter by lr · g / (|g| + eps)). Returns the new parameters,
    the loss and the kept (token, latent) pairs."""
    p = {n: t.clone().double().requires_grad_(True) for n, t in params.items()}
    xs = [[x_BMD[b, m].double() * float(scale_M[m]) for m in range(2)] for b in range(B)]
    norms = [sum(float(p["W_dec_FMD"][f, m].detach().norm()) for m in range(2)) for f in range(F)]
    pre = [[sum((xs[b][m] - p["b_dec_MD"][m]) @ p["W_enc_MDF"][m][:, f] for m in range(2)) + p["b_enc_F"][f]
            for f in range(F)] for b in range(B)]  # fmt: skip
    cands = [(float(pre[b][f].detach()) * norms[f], b, f) for b in range(B) for f in range(F) if pre[b][f] > 0]
    kept = {(b, f) for _, b, f in sorted(cands, key=lambda c: -c[0])[: K * B]}
    mse = 0.0
    errs = []
    for b in range(B):
        err_b = []
        for m in range(2):
            recon = p["b_dec_MD"][m] + sum(pre[b][f] * p["W_dec_FMD"][f, m] for f in range(F) if (b, f) in kept)
            err_b.append(xs[b][m] - recon)
            mse = mse + (xs[b][m] - recon).pow(2).sum()
        errs.append(err_b)
    mse = mse / B
    auxk = torch.zeros((), dtype=torch.float64)
    if dead:
        aux_k = min(D, len(dead))  # the trainer's aux_k: d_in (half of the 2·d_in input)
        e = [[errs[b][m].detach() for m in range(2)] for b in range(B)]
        num = den = 0.0
        mean = [sum(e[b][m] for b in range(B)) / B for m in range(2)]
        for b in range(B):
            top = sorted(dead, key=lambda f: -float(pre[b][f].detach()))[:aux_k]
            for m in range(2):
                e_hat = sum(torch.relu(pre[b][f]) * p["W_dec_FMD"][f, m] for f in top)
                num = num + (e[b][m] - e_hat).pow(2).sum()
                den = den + (e[b][m] - mean[m]).pow(2).sum()
        auxk = num / den
    loss = mse + auxk / 32
    loss.backward()
    new = {n: (t - LR * t.grad / (t.grad.abs() + EPS)).detach() for n, t in p.items()}
    return {"params": new, "loss": float(loss.detach()), "kept": kept, "norms": norms, "pre": pre}


@pytest.mark.parametrize("dead_tokens", [10**9, 1])
def test_step_matches_naive(dead_tokens: int) -> None:
    """dead_tokens 1: every latent that did not fire in the batch is dead, so AuxK is in the loss."""
    torch.manual_seed(0)
    sample = torch.randn(64, 2, D) + torch.tensor([[0.5, 0.0, 0.0], [0.5, 1.0, 0.0]])
    tr = CrossCoderTrainer(D, F, K, sample, lr=LR, dead_tokens=dead_tokens)
    tr.optimizer.param_groups[0]["eps"] = EPS
    with torch.no_grad():  # unequal decoder norms, so that the weighting changes which pairs the top-k keeps
        tr.cc.W_dec_FMD.mul_(torch.tensor([0.1, 4.0, 0.3, 2.0, 0.05, 1.0])[:, None, None])
    x_BMD = torch.randn(B, 2, D)
    pre_BF = tr.cc.pre_acts(tr.cc.scaled(x_BMD)).detach()
    unweighted = {(int(i) // F, int(i) % F) for i in pre_BF.relu().flatten().topk(K * B).indices}
    before = {n: t.detach().clone() for n, t in tr.cc.named_parameters()}
    _, _, acts_BF = tr.cc.encode_train(x_BMD)
    kept_pairs = {(int(b), int(f)) for b, f in (acts_BF > 0).nonzero()}
    dead = set(range(F)) - {f for _, f in kept_pairs} if dead_tokens == 1 else set()
    want = naive_step(before, tr.cc.scale_M, x_BMD, dead)
    assert kept_pairs == want["kept"] and len(kept_pairs) == K * B
    assert kept_pairs != unweighted  # the case discriminates the decoder-norm weighting
    metrics = tr.step(x_BMD)
    assert (metrics["auxk_loss"] > 0) == bool(dead)
    assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for name, t in tr.cc.named_parameters():
        torch.testing.assert_close(t.detach().double(), want["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    # the threshold after one step is the smallest kept decoder-weighted activation (bias-corrected EMA of one value)
    smallest = min(float(want["pre"][b][f].detach()) * want["norms"][f] for b, f in want["kept"])
    assert float(tr.cc.threshold) == pytest.approx(smallest, rel=1e-5)


def test_encode_decode_and_diff_directions() -> None:
    cc = CrossCoder(D, F, K, seed=1)
    with torch.no_grad():
        cc.scale_M.copy_(torch.tensor([2.0, 4.0]))
        cc.threshold.fill_(0.1)
    x_BMD = torch.randn(5, 2, D)
    acts_BF = cc.encode(x_BMD)
    relu_BF = cc.pre_acts(cc.scaled(x_BMD)).relu()
    v_BF = relu_BF * cc.W_dec_FMD.norm(dim=2).sum(dim=1)
    torch.testing.assert_close(acts_BF, torch.where(v_BF > 0.1, relu_BF, 0.0))
    xhat = cc.decode(acts_BF)
    want = (acts_BF @ cc.W_dec_FMD[:, BASE] + cc.b_dec_MD[BASE]) / 2.0
    torch.testing.assert_close(xhat[:, BASE], want)
    d_FD = cc.diff_directions_FD()
    torch.testing.assert_close(d_FD, cc.W_dec_FMD[:, FT].detach() / 4.0 - cc.W_dec_FMD[:, BASE].detach() / 2.0)


def test_latent_scaling_by_hand() -> None:
    """d = (1, 0); f = 1, 2, 0; Y = (2, 5), (4, -1), (9, 9): β = (1·2 + 2·4) / (1 · (1 + 4)) = 2; with the latent's
    own part subtracted (own = (3, 0), c = −1): β = (10 − 3 · 5) / 5 = −1; batches accumulate."""
    acts = torch.tensor([[1.0], [2.0], [0.0]])
    Y = torch.tensor([[2.0, 5.0], [4.0, -1.0], [9.0, 9.0]])
    ls = LatentScaling(torch.tensor([[1.0, 0.0]]))
    ls.update(acts[:2], Y[:2])
    ls.update(acts[2:], Y[2:])
    assert float(ls.betas()[0]) == pytest.approx(2.0) and int(ls.count_F[0]) == 2
    own = LatentScaling(torch.tensor([[1.0, 0.0]]))
    own.update(acts, Y, torch.tensor([[3.0, 0.0]]), -1.0)
    assert float(own.betas()[0]) == pytest.approx(-1.0)
    never = LatentScaling(torch.tensor([[1.0, 0.0]]))
    never.update(torch.zeros(3, 1), Y)
    assert math.isnan(float(never.betas()[0]))


def test_latent_scaling_recovers_planted_betas() -> None:
    """y = Σ_j β_j f_j d_j + noise orthogonal to every d_j: each β_j comes back exactly."""
    g = torch.Generator().manual_seed(3)
    dirs = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0].T  # 4 orthonormal rows
    dirs = dirs * torch.tensor([[0.5], [2.0], [1.0], [3.0]], dtype=torch.float64)
    acts = torch.rand(200, 4, generator=g, dtype=torch.float64) * (torch.rand(200, 4, generator=g) < 0.3)
    beta = torch.tensor([1.5, -0.7, 0.0, 4.0], dtype=torch.float64)
    noise = torch.randn(200, 16, generator=g, dtype=torch.float64)
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    noise -= (noise @ unit.T) @ unit
    ls = LatentScaling(dirs)
    for s in (slice(0, 70), slice(70, 200)):
        ls.update(acts[s], (acts[s] * beta) @ dirs + noise[s])
    torch.testing.assert_close(ls.betas(), beta, atol=1e-10, rtol=1e-10)


def test_scaling_ratios_one_when_the_models_agree() -> None:
    """Identical models (same data, same decoder per model): the base explains every latent as much as the
    finetune does, so ν^ε = ν^r = 1 wherever a latent fires."""
    cc = CrossCoder(D, F, K, seed=2)
    with torch.no_grad():
        cc.W_dec_FMD[:, BASE] = cc.W_dec_FMD[:, FT]
        cc.b_dec_MD[BASE] = cc.b_dec_MD[FT]
    x = torch.randn(50, 1, D).expand(-1, 2, -1).contiguous()
    r = latent_scaling_ratios(cc, [x[:20], x[20:]])
    fired = r.count > 0
    assert fired.sum() > 0
    torch.testing.assert_close(r.nu_error[fired], torch.ones(int(fired.sum()), dtype=torch.float64))
    torch.testing.assert_close(r.nu_recon[fired], torch.ones(int(fired.sum()), dtype=torch.float64))


def test_threshold_calibration_gives_l0_k() -> None:
    cc = CrossCoder(D, F, K, seed=4)
    x = [torch.randn(40, 2, D), torch.randn(24, 2, D)]
    calibrate_threshold(cc, x, k=2)
    l0 = sum(int((cc.encode(b) > 0).sum()) for b in x) / 64
    assert l0 == pytest.approx(2.0, abs=1 / 64)


def test_diff_view_patches_the_crosscoders_diff() -> None:
    """Seen through DiffView, the attribution path's α = 1 patch is h_base + x̂_ft − x̂_base at every analysed token,
    and the integrated gradients of its latents sum to the KL drop (completeness)."""
    base, ft = make_pair()
    ids, mask = right_padded()
    cc = CrossCoder(D_MODEL, 48, 6, seed=5)
    with torch.no_grad():
        cc.scale_M.copy_(torch.tensor([0.7, 0.9]))
        cc.b_dec_MD.normal_(0, 0.1)
    view = DiffView(cc)
    with frozen(base, ft):
        r = patched_runs(base, ft, LAYER, ids, mask, view, skip_first=1)
    a = r.analysed_BT
    h_base = r.start_BTD[a] - view.b_dec_D
    xhat = cc.decode(cc.encode(torch.stack([h_base, r.h_ft_BTD[a]], dim=1)))
    assert r.act_P.numel() > 0
    want = h_base + xhat[:, FT] - xhat[:, BASE]
    torch.testing.assert_close(r.start_BTD[a] + r.delta_BTD[a], want, atol=1e-5, rtol=1e-5)
    out = attribute_batch(base, ft, LAYER, ids, mask, view, steps=32)
    err = abs(out.attr_sum_B - out.kl_drop_B) / abs(out.kl_drop_B)
    assert err.max() < 0.01
