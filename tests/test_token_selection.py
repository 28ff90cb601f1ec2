"""Cheaper attribution, on the tiny random Llama pair of tests/test_attribution.py: token selection
(`attribution.tokens: select`: which tokens' KL the gradient passes attribute, with inverse-probability weights),
and the base model stopping at the layer when extraction's KL is given.

    pytest tests/test_token_selection.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsae.attribution import Selection, attribute_batch, select_tokens
from tests.test_attribution import LAYER, StandInSAE, make_pair, right_padded

LENGTHS = (24, 15, 19)
N_DRAWS = 48


@pytest.fixture(scope="module")
def pair():
    return make_pair(seed=2)


@pytest.fixture(scope="module")
def sae() -> StandInSAE:
    return StandInSAE(seed=1)


def test_weights_by_hand() -> None:
    kl0_BT = torch.tensor([[9.0, 0.5, 3.0, 3.0, 0.1, 7.0], [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    analysed_BT = torch.tensor([[False, True, True, True, True, True], [False, True, False, False, False, False]])
    w = select_tokens(kl0_BT, analysed_BT, Selection(top=0.4, sample=0.25, seeds=[5, 6]))
    # row 0: 5 analysed tokens, ceil(0.4 * 5) = 2 by KL(0): 7.0 (col 5) and the earlier of the 3.0 tie (col 2)
    assert w[0, 5] == 1.0 and w[0, 2] == 1.0 and w[0, 0] == 0.0
    assert all(float(w[0, c]) in (0.0, 4.0) for c in (1, 3, 4))
    # row 1: one analysed token, always in the top share; nothing else is ever weighted
    assert w[1].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # the draw is the document's own: same seed, same weights whatever the batch holds
    alone = select_tokens(kl0_BT[:1], analysed_BT[:1], Selection(top=0.4, sample=0.25, seeds=[5]))
    assert torch.equal(alone[0], w[0])
    # top = 0 and sample = 1 draw every token; top = 1 keeps every token
    for sel in (Selection(0.0, 1.0, [5, 6]), Selection(1.0, 0.1, [5, 6])):
        assert torch.equal(select_tokens(kl0_BT, analysed_BT, sel), analysed_BT.float())
    with pytest.raises(ValueError, match="0 < sample <= 1"):
        select_tokens(kl0_BT, analysed_BT, Selection(0.1, 0.0, [5, 6]))
    with pytest.raises(ValueError, match="2 seeds for 1 documents"):
        select_tokens(kl0_BT[:1], analysed_BT[:1], Selection(0.1, 0.5, [5, 6]))


def test_selecting_every_token_equals_all(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT = right_padded(LENGTHS)
    full = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=6)
    every = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=6, select=Selection(0.0, 1.0, [1, 2, 3]))
    np.testing.assert_allclose(every.attribution, full.attribution, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.nan_to_num(full.weight_BT), np.nan_to_num(every.weight_BT))
    assert np.nansum(full.weight_BT) == sum(n - 1 for n in LENGTHS)  # skip_first = 1: the first token is not scored


def test_sampled_estimate_is_unbiased(pair, sae) -> None:
    """Over seeded draws, the mean of each document's total attribution, and of the three latents with the largest
    total, is within 2 standard errors of its value with every token attributed; records are the same pairs."""
    base, ft = pair
    ids_BT, mask_BT = right_padded(LENGTHS)
    full = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=6)
    lat_total = np.bincount(full.latent_id, weights=full.attribution)
    top_lat = np.argsort(-np.abs(lat_total))[:3]

    def aggregates(res) -> np.ndarray:  # type: ignore[no-untyped-def]
        per_doc = np.bincount(res.batch_idx, weights=res.attribution, minlength=len(LENGTHS))
        per_lat = np.bincount(res.latent_id, weights=res.attribution, minlength=len(lat_total))[top_lat]
        return np.concatenate([per_doc, per_lat])

    want = aggregates(full)
    draws, shares = [], []
    for s in range(N_DRAWS):
        seeds = [1000 * s + b for b in range(len(LENGTHS))]
        res = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=6, select=Selection(0.2, 0.3, seeds))
        assert (res.latent_id == full.latent_id).all() and (res.pos == full.pos).all()  # every record reported
        draws.append(aggregates(res))
        shares.append(float(np.nansum(res.weight_BT > 0)) / float(np.nansum(full.weight_BT)))
    draws_KA = np.array(draws)
    mean_A = draws_KA.mean(axis=0)
    se_A = draws_KA.std(axis=0, ddof=1) / math.sqrt(N_DRAWS)
    print("full", want, "\nmean", mean_A, "\nse", se_A, "\nshare attributed", np.mean(shares))
    assert (se_A > 1e-3 * np.abs(want)).all(), "the draws must actually vary (else the check proves nothing)"
    assert (np.abs(mean_A - want) <= 2 * se_A).all(), (mean_A - want) / se_A
    assert 0.3 < np.mean(shares) < 0.6  # ~ 0.2 + 0.8 * 0.3 (+ rounding up of the top share)


def test_known_kl_skips_the_base_upper_blocks(pair, sae) -> None:
    """Given extraction's KL(p_ft ‖ p_base), the base model stops at the layer; every output is unchanged."""
    base, ft = pair
    ids_BT, mask_BT = right_padded(LENGTHS)
    full = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4)
    ran: list[str] = []
    handle = base.lm_head.register_forward_hook(lambda *_: ran.append("head"))
    try:
        known = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4, kl_BT=torch.tensor(full.kl_BT))
    finally:
        handle.remove()
    assert ran == []  # the base's head (and every block above LAYER) never ran
    for name in ("kl_BT", "kl_patch_base_BT", "kl_patch_bias_BT", "kl_patch_recon_BT", "weight_BT"):
        np.testing.assert_array_equal(getattr(known, name), getattr(full, name), err_msg=name)
    np.testing.assert_array_equal(known.attribution, full.attribution)
