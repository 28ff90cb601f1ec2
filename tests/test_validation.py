"""diffsae.validation on a tiny random Llama pair (CPU, seconds): ablation and steering identities, the generation
loop against transformers' own greedy `generate`, and per-step ablation during generation against the
teacher-forced ablation of the finished sequence.

    pytest tests/test_validation.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from diffsae import validation as va
from diffsae.hooks import read_residual, replace_residual
from diffsae.sae import BatchTopKSAE
from tests.test_attribution import make_pair

LAYER, D, V, F, EOS, PAD = 1, 16, 64, 48, 2, 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return make_pair(0, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)


@pytest.fixture(scope="module")
def sae() -> BatchTopKSAE:
    s = BatchTopKSAE(D, F, k=4, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        s.b_enc_F.copy_(0.05 * torch.randn(F, generator=g))
        s.b_dec_D.copy_(0.1 * torch.randn(D, generator=g))
        s.b_enc_F[7] = -1e4  # latent 7 never fires
        s.scale.fill_(0.7)
        s.threshold.fill_(0.02)
    return s.eval()


def docs(lengths: tuple[int, ...] = (12, 7, 9), seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, V, (n - 1,), generator=g).tolist() for n in lengths]


def residuals(model: torch.nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    pos_BT = (mask_BT.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), read_residual(model, LAYER) as cap:
        model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT)
    return cap.value.float()


def test_ablating_a_silent_latent_is_the_identity(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT, pos_BT = va.left_padded(docs(), PAD, torch.device("cpu"))
    r = va.ablation_kl(base, ft, LAYER, ids_BT, mask_BT, sae, [7])
    assert not r.fires_BT.any()
    np.testing.assert_array_equal(r.kl_ablated_BT, r.kl_BT)
    # the logits themselves, through the generation edit
    h_ft, h_base = residuals(ft, ids_BT, mask_BT), residuals(base, ids_BT, mask_BT)
    kw = {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": pos_BT}
    with torch.no_grad():
        plain = ft(**kw).logits
        edit = va.ablation_edit(sae, [7])
        with replace_residual(ft, LAYER, lambda h: edit(h, h_base, mask_BT.bool())):
            ablated = ft(**kw).logits
    assert torch.equal(plain, ablated)
    assert torch.equal(va.ablate(h_ft, h_base, sae, [7], mask_BT.bool())[0], h_ft)


def test_ablating_every_active_latent_leaves_base_plus_bias_plus_error(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT, _ = va.left_padded(docs(), PAD, torch.device("cpu"))
    h_ft, h_base = residuals(ft, ids_BT, mask_BT), residuals(base, ids_BT, mask_BT)
    keep = mask_BT.bool()
    h_abl, acts = va.ablate(h_ft, h_base, sae, list(range(F)), keep)
    diff = (h_ft - h_base)[keep]
    with torch.no_grad():
        recon = sae.decode(sae.encode(diff))  # includes b_dec / scale
        want = h_base[keep] + sae.b_dec_D / sae.scale + (diff - recon)
    assert (acts[keep] > 0).sum(-1).min() >= 1  # every token has active latents
    torch.testing.assert_close(h_abl[keep], want, rtol=1e-5, atol=1e-5)
    # moved by exactly minus the reconstruction without the bias
    torch.testing.assert_close(h_abl[keep] - h_ft[keep], -(recon - sae.b_dec_D / sae.scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_abl[~keep], h_ft[~keep])  # padding untouched


def test_ablation_kl_removes_kl_of_all_latents(pair, sae) -> None:
    base, ft = pair
    ids_BT, mask_BT, _ = va.left_padded(docs(), PAD, torch.device("cpu"))
    one = va.ablation_kl(base, ft, LAYER, ids_BT, mask_BT, sae, [3])
    assert one.fires_BT.any() and not one.fires_BT[:, 0].any() and one.analysed_BT.sum() == mask_BT.sum() - 3
    assert va.kl_removed(np.array([2.0]), np.array([0.5])) == pytest.approx(0.75)
    assert np.isnan(va.kl_removed(np.array([0.0]), np.array([0.0])))


def test_greedy_generate_matches_transformers(pair) -> None:
    _, ft = pair
    prompts = [p[:5] for p in docs((9, 6, 8))] + [[1, 5]]
    ours = va.greedy_generate(ft, LAYER, prompts, 10, [EOS], PAD)
    ids_BT, mask_BT, _ = va.left_padded(prompts, PAD, torch.device("cpu"))
    ref = ft.generate(input_ids=ids_BT, attention_mask=mask_BT, max_new_tokens=10, do_sample=False,
                      eos_token_id=EOS, pad_token_id=PAD)[:, ids_BT.shape[1]:].tolist()  # fmt: skip
    for got, want in zip(ours, ref):
        want = want[: want.index(EOS) + 1] if EOS in want else want
        assert got == want


def test_steering_at_scale_zero_is_the_identity(pair, sae) -> None:
    base, _ = pair
    prompts = [p[:6] for p in docs()]
    plain = va.greedy_generate(base, LAYER, prompts, 8, [EOS], PAD)
    vec = va.steering_vector(sae, [3, 5], [1.0, 2.0])
    zero = va.greedy_generate(base, LAYER, prompts, 8, [EOS], PAD, edit=va.steering_edit(vec, torch.zeros(3)))
    assert zero == plain
    strong = va.greedy_generate(base, LAYER, prompts, 8, [EOS], PAD, edit=va.steering_edit(50 * vec, torch.ones(3)))
    assert strong != plain


def test_ablation_during_generation_matches_teacher_forcing(pair, sae) -> None:
    """Per-step ablation with both KV caches = the ablated forward of the finished sequences."""
    base, ft = pair
    prompts = [p[:6] for p in docs()]
    lat = [3, 11]
    gens = va.greedy_generate(ft, LAYER, prompts, 8, [EOS], PAD, edit=va.ablation_edit(sae, lat), partner=base)
    seqs = [p + g for p, g in zip(prompts, gens)]
    ids_BT, mask_BT, pos_BT = va.left_padded(seqs, PAD, torch.device("cpu"))
    keep = mask_BT.bool() & (pos_BT >= 1)
    h_abl, _ = va.ablate(residuals(ft, ids_BT, mask_BT), residuals(base, ids_BT, mask_BT), sae, lat, keep)
    with torch.no_grad(), replace_residual(ft, LAYER, h_abl):
        logits = ft(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits
    T = ids_BT.shape[1]
    for b, g in enumerate(gens):
        pred = logits[b, T - len(g) - 1 : T - 1].argmax(-1).tolist()
        assert pred == g
    plain = va.greedy_generate(ft, LAYER, prompts, 8, [EOS], PAD)
    rows_only = va.ablation_edit(sae, lat, torch.tensor([False, True, False]))
    mixed = va.greedy_generate(ft, LAYER, prompts, 8, [EOS], PAD, edit=rows_only, partner=base)
    assert mixed[0] == plain[0] and mixed[2] == plain[2] and mixed[1] == gens[1]


def test_choose_scale_keeps_the_strongest_coherent() -> None:
    assert va.choose_scale([0, 1, 2, 4], [1.0, 1.2, 1.9, 3.5], reference=1.0, margin=1.0) == 2
    assert va.choose_scale([0, 1, 2], [1.0, 5.0, 1.5], reference=1.0, margin=1.0) == 2  # strongest, not first
    assert va.choose_scale([0, 1], [float("nan"), 9.0], reference=1.0, margin=1.0) == 0


def test_validate_latent(pair, sae) -> None:
    base, ft = pair
    d = docs((12, 7, 9, 10))
    out = va.validate_latent(base, ft, LAYER, sae, [3], [1.5], d, [x[:5] for x in d[:3]], pad_id=PAD,
                             eos_ids=[EOS], max_new_tokens=6, scales=[4, 1, 2], margin=0.5)  # fmt: skip
    assert out.scales == [0.0, 1.0, 2.0, 4.0] and len(out.steered) == 4 and len(out.steering_nll) == 4
    assert len(out.finetuned) == len(out.ablated) == 3 and 0 <= out.generations_changed <= 1
    assert out.n_firing_tokens > 0 and out.kl_removed_on_firing <= 1 and np.isfinite(out.kl_removed_elsewhere)
    assert out.steered[0] == va.greedy_generate(base, LAYER, [x[:5] for x in d[:3]], 6, [EOS], PAD)
    assert out.steering_nll[out.best_scale_index] <= out.coherence_limit
    silent = va.validate_latent(base, ft, LAYER, sae, [7], [1.0], d, [x[:5] for x in d[:3]], pad_id=PAD,
                                eos_ids=[EOS], max_new_tokens=6, scales=[1.0], margin=0.5)  # fmt: skip
    assert silent.n_firing_tokens == 0 and silent.generations_changed == 0.0
    assert np.isnan(silent.kl_removed_on_firing) and silent.kl_removed_elsewhere == pytest.approx(0.0, abs=1e-6)
