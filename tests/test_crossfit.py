"""`diffsae.train.crossfit_l0`: two-fold cross-fitted inference L0, against a dense re-implementation."""

from __future__ import annotations

import pytest
import torch

from diffsae.sae import BatchTopKSAE
from diffsae.train import crossfit_l0


def dense_cut(sae: BatchTopKSAE, x_ND: torch.Tensor, k: int) -> float:
    """The (k*N + 1)-th largest post-ReLU pre-activation by a full sort (calibrate_threshold's definition)."""
    return float(torch.sort(sae.pre_acts(x_ND).relu().flatten(), descending=True).values[k * x_ND.shape[0]])


@pytest.mark.parametrize("n_docs", [2, 5, 8])
def test_crossfit_l0_matches_dense_reference(n_docs):
    k = 4
    gen = torch.Generator().manual_seed(n_docs)
    sae = BatchTopKSAE(16, 128, k=k, seed=1)
    sae.threshold.fill_(0.123)
    docs = [torch.randn(10 + 7 * i, 16, generator=gen) * (1 + i % 3) for i in range(n_docs)]  # unequal docs
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(7)).tolist()
    a, b = [docs[i] for i in perm[: n_docs // 2]], [docs[i] for i in perm[n_docs // 2 :]]
    active = 0
    for fit, held in ((a, b), (b, a)):
        cut = dense_cut(sae, torch.cat(fit), k)
        active += sum(int((sae.pre_acts(x) > cut).sum()) for x in held)
    want = active / sum(x.shape[0] for x in docs)
    with torch.no_grad():
        assert crossfit_l0(sae, docs, k, seed=7) == pytest.approx(want)
    assert float(sae.threshold) == pytest.approx(0.123)  # left as it was


def test_crossfit_l0_identical_halves_is_k_and_needs_two_docs():
    """Two copies of one document: each half's threshold is calibrated on the very same tokens, so L0 = k exactly."""
    sae = BatchTopKSAE(8, 64, k=3, seed=0)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert crossfit_l0(sae, [x, x.clone()], 3, seed=0) == pytest.approx(3.0, abs=1 / 50)
    with pytest.raises(ValueError, match="two documents"):
        crossfit_l0(sae, [x], 3, seed=0)
