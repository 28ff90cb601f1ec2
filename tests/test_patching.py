"""The forward-only patched runs (diffsae/patching.py), the quadrature rules of the integrated-gradients path and
the attribution stage's refinement of documents that miss completeness."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from diffsae.attribution import attribute_batch
from tests.test_attribution import LAYER, LENGTHS, StandInSAE, completeness_errors, make_pair, right_padded


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_pair()


@pytest.fixture(scope="module")
def sae() -> StandInSAE:
    return StandInSAE()


def assert_same_but_batch(actual: np.ndarray, desired: np.ndarray) -> None:
    """One document attributed inside a batch and on its own: the same arithmetic, but BLAS blocks a matmul by its
    shape, so float32 sums round differently (measured: up to 1.5e-6 of the largest value under MKL_CBWR=AVX2 or
    COMPATIBLE, i.e. other CPUs' kernels; within rtol 1e-5 with this AMX machine's). Tolerance: 1e-5 of that scale."""
    np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-5 * float(np.abs(desired).max()))

# ---------------------------------------------------------------- forward-only patching


def test_patched_kl_is_forward_only_and_equals_attribution(pair, sae) -> None:
    """The KL-gap metric's patched runs need no gradient (they run under inference mode, where autograd is off)
    and give exactly attribute_batch's per-token KL columns; kl_gap_recovered is 1 − Σ recon / Σ base of them."""
    from diffsae.data import Doc
    from diffsae.patching import kl_gap_recovered, patched_kl

    base, ft = pair
    ids_BT, mask_BT = right_padded()
    with torch.inference_mode():
        fwd = patched_kl(base, ft, LAYER, ids_BT, mask_BT, sae)
    full = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=2)
    for name in fwd._fields:
        np.testing.assert_array_equal(getattr(fwd, name), getattr(full, name))
    docs = [Doc(b, str(b), "", "none", ids_BT[b, :n].tolist(), ["text"] * n) for b, n in enumerate(LENGTHS)]
    with torch.inference_mode():
        gap = kl_gap_recovered(base, ft, LAYER, sae, docs, pad_id=0, batch_tokens=1 << 10)
    want = 1 - np.nansum(full.kl_patch_recon_BT) / np.nansum(full.kl_patch_base_BT)
    assert gap == pytest.approx(float(want), rel=1e-5) and 0 < gap < 1


def test_gauss_legendre_rule_is_exact_for_polynomials_and_converges(pair, sae) -> None:
    """The Gauss–Legendre nodes/weights integrate degree 2n − 1 polynomials on [0, 1] exactly; on a real patched
    path its completeness error shrinks with n (measured here: 12 % at 4 points, 0.05 % at 16) and the endpoints
    do not depend on the rule."""
    from diffsae.attribution import quadrature

    for n in (1, 3, 5):
        x, w = quadrature("gauss_legendre", n)
        assert w.sum() == pytest.approx(1.0) and ((0 < x) & (x < 1)).all()
        for deg in range(2 * n):
            assert (w * x**deg).sum() == pytest.approx(1 / (deg + 1), rel=1e-12)
    x, w = quadrature("midpoint", 4)
    assert list(x) == [0.125, 0.375, 0.625, 0.875] and list(w) == [0.25] * 4
    with pytest.raises(ValueError, match="unknown quadrature"):
        quadrature("simpson", 4)  # type: ignore[arg-type]

    base, ft = pair
    ids_BT, mask_BT = right_padded()
    gl4 = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4, rule="gauss_legendre")
    gl16 = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, rule="gauss_legendre")
    assert completeness_errors(gl16).max() < min(0.01, completeness_errors(gl4).max() / 10)
    np.testing.assert_array_equal(gl4.kl_drop_B, gl16.kl_drop_B)  # same endpoints, whatever the rule


def test_documents_missing_completeness_are_refined(pair, sae) -> None:
    """The attribution stage refines (doubles the points of) a document whose completeness misses the tolerance,
    keeps the better result, and stops at max_steps."""
    from types import SimpleNamespace

    from diffsae.config import AttributionConfig
    from diffsae.data import Doc
    from diffsae.documents import attribute_docs
    from diffsae.models import ModelPair

    base, ft = pair
    ids_BT, _ = right_padded()
    docs = [Doc(b, str(b), "", "none", ids_BT[b, :n].tolist(), ["text"] * n) for b, n in enumerate(LENGTHS)]
    mp = ModelPair(base, ft, SimpleNamespace(pad_token_id=0), torch.device("cpu"), "b", "f")
    cfg = AttributionConfig(steps=2, max_steps=2, tokens="all", rule="midpoint", precision="float32")
    coarse = attribute_docs(mp, LAYER, sae, docs, cfg, 1, 2)
    assert [a.steps for a in coarse] == [2, 2, 2] and max(a.rel_error for a in coarse) > 0.05  # no refinement
    fine = attribute_docs(mp, LAYER, sae, docs, cfg.model_copy(update={"max_steps": 32}), 1, 2)
    assert all(a.rel_error <= 0.01 or a.steps == 32 for a in fine)
    assert all(f.rel_error <= c.rel_error and f.steps >= 4 for f, c in zip(fine, coarse))
    direct = attribute_batch(base, ft, LAYER, ids_BT[:1, :LENGTHS[0]], torch.ones(1, LENGTHS[0], dtype=torch.long),
                             sae, steps=fine[0].steps)  # fmt: skip
    assert_same_but_batch(fine[0].records["kl_attribution"], direct.attribution)


def test_bfloat16_gradient_passes_keep_the_float32_endpoints(pair, sae) -> None:
    """precision="bfloat16" rounds only the gradient passes' block matmuls: the KL columns and the completeness target
    are bit-identical to float32, the attributions close to them (not identical: the autocast is in effect), and
    the attribution stage redoes a document that misses the tolerance in float32 with twice the points."""
    from types import SimpleNamespace

    from diffsae.config import AttributionConfig
    from diffsae.data import Doc
    from diffsae.documents import attribute_docs, gradient_precision
    from diffsae.models import ModelPair
    from diffsae.patching import fast_bfloat16

    base, ft = pair
    ids_BT, mask_BT = right_padded()
    f32 = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, rule="gauss_legendre")
    bf16 = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=16, rule="gauss_legendre", precision="bfloat16")
    for name in ("kl_BT", "kl_patch_base_BT", "kl_patch_bias_BT", "kl_patch_recon_BT", "kl_drop_B", "activation"):
        np.testing.assert_array_equal(getattr(bf16, name), getattr(f32, name))
    scale = np.abs(f32.attribution).max()
    assert not np.array_equal(bf16.attribution, f32.attribution)
    np.testing.assert_allclose(bf16.attribution, f32.attribution, rtol=0, atol=0.02 * scale)
    assert np.corrcoef(bf16.attribution, f32.attribution)[0, 1] > 0.999
    assert completeness_errors(bf16).max() < 0.01 and completeness_errors(f32).max() < 0.01

    cpu = torch.device("cpu")
    assert gradient_precision(AttributionConfig(precision="float32"), cpu) == "float32"
    assert gradient_precision(AttributionConfig(precision="bfloat16"), cpu) == "bfloat16"
    assert gradient_precision(AttributionConfig(), cpu) == "float32"  # the default (docs/BENCHMARKS.md)
    assert gradient_precision(AttributionConfig(precision="auto"), cpu) == ("bfloat16" if fast_bfloat16(cpu) else
                                                                            "float32")  # fmt: skip

    docs = [Doc(b, str(b), "", "none", ids_BT[b, :n].tolist(), ["text"] * n) for b, n in enumerate(LENGTHS)]
    mp = ModelPair(base, ft, SimpleNamespace(pad_token_id=0), cpu, "b", "f")
    cfg = AttributionConfig(steps=2, max_steps=4, tokens="all", rule="midpoint", precision="bfloat16")
    out = attribute_docs(mp, LAYER, sae, docs, cfg, 1, 2)
    redone = [b for b, a in enumerate(out) if a.steps == 4]
    assert redone, "the case must have a document that misses the tolerance at 2 points"
    for b in redone:
        n = LENGTHS[b]
        direct = attribute_batch(base, ft, LAYER, ids_BT[b : b + 1, :n], torch.ones(1, n, dtype=torch.long), sae,
                                 steps=4)  # float32  # fmt: skip
        assert_same_but_batch(out[b].records["kl_attribution"], direct.attribution)


def test_stored_states_give_the_recomputed_attribution(pair, sae) -> None:
    """With extraction's stored states (diffsae.extract.paired_forward: h_base, h_ft at the layer and x_ft) and its KL,
    neither model runs unpatched (a model that raises unless patched proves it) and every output equals the
    recomputing path; the attribution stage's documents path pads them the same way (attribute_docs(states=))."""
    from types import SimpleNamespace

    from diffsae.config import AttributionConfig
    from diffsae.data import Doc
    from diffsae.documents import attribute_docs
    from diffsae.extract import paired_forward
    from diffsae.head import _CHECKED
    from diffsae.hooks import decoder_layers
    from diffsae.models import ModelPair

    base, ft = pair
    ids_BT, mask_BT = right_padded()
    ref = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4, rule="gauss_legendre")
    states, kl_BT = paired_forward(base, ft, LAYER, ids_BT, mask_BT, torch.float32)
    np.testing.assert_allclose(np.nan_to_num(ref.kl_BT), kl_BT * mask_BT, rtol=1e-5, atol=1e-7)

    calls = {"base": 0, "lower": 0, "upper": 0}

    def count(name: str) -> Callable[..., None]:
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    _CHECKED.pop(ft, None)  # as in a fresh process (the stage's): the head's one-time check runs first, unpatched
    kw = {"steps": 4, "rule": "gauss_legendre", "kl_BT": kl_BT, "states": states}
    first = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, **kw)  # type: ignore[arg-type]
    hooks = [base.register_forward_pre_hook(count("base")),
             decoder_layers(ft)[LAYER].mlp.register_forward_hook(count("lower")),
             decoder_layers(ft)[LAYER + 1].mlp.register_forward_hook(count("upper"))]  # fmt: skip
    try:
        got = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, **kw)  # type: ignore[arg-type]
    finally:
        for h in hooks:
            h.remove()
    assert calls["base"] == calls["lower"] == 0 < calls["upper"]  # no base forward; the finetuned one above LAYER
    for name in ref._fields:
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(getattr(first, name), getattr(got, name))
    with pytest.raises(ValueError, match="kl_BT"):
        attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=4, states=states)

    docs = [Doc(b, str(b), "", "none", ids_BT[b, :n].tolist(), ["text"] * n) for b, n in enumerate(LENGTHS)]
    mp = ModelPair(base, ft, SimpleNamespace(pad_token_id=0), torch.device("cpu"), "b", "f")
    cfg = AttributionConfig(steps=4, tokens="all", rule="gauss_legendre", precision="float32")
    kls = {b: kl_BT[b, :n].numpy() for b, n in enumerate(LENGTHS)}
    stored = {b: torch.stack(list(states), 2)[b, :n].numpy() for b, n in enumerate(LENGTHS)}  # [n, 3, D]
    plain, reused = (attribute_docs(mp, LAYER, sae, docs, cfg, 1, 4, kls, states=s) for s in (None, stored))
    for a, b in zip(plain, reused):
        assert a.steps == b.steps
        np.testing.assert_allclose(b.records["kl_attribution"], a.records["kl_attribution"], rtol=1e-5, atol=1e-6)
        for name in a.per_token:
            np.testing.assert_allclose(b.per_token[name], a.per_token[name], rtol=1e-5, atol=1e-7)


# QUADPACK's 15-point Kronrod extension of the 7-point Gauss rule on [-1, 1] (qk15: xgk, wgk), the upper half.
QK15_X = [0.991455371120813, 0.949107912342759, 0.864864423359769, 0.741531185599394, 0.586087235467691,
          0.405845151377397, 0.207784955007898, 0.0]  # fmt: skip
QK15_W = [0.022935322010529, 0.063092092629979, 0.104790010322250, 0.140653259715525, 0.169004726639267,
          0.190350578064785, 0.204432940075298, 0.209482141084728]  # fmt: skip


def test_kronrod_extension_matches_quadpack_and_is_exact() -> None:
    """The (2n + 1)-point Kronrod rule holds the n Gauss nodes, reproduces QUADPACK's qk15 for n = 7 and integrates
    polynomials of degree 3n + 1 exactly (3n + 2 for odd n), with positive weights inside (0, 1)."""
    from diffsae.quadrature import kronrod, quadrature

    x, w = quadrature("gauss_kronrod", 7)
    np.testing.assert_allclose(2 * x[7:] - 1, QK15_X[::-1], atol=1e-14)
    np.testing.assert_allclose(2 * w[7:], QK15_W[::-1], atol=1e-14)
    for n in (1, 2, 4, 5, 8, 16):
        gauss, w_g, new, w_new = kronrod(n)
        np.testing.assert_allclose(gauss, quadrature("gauss_legendre", n)[0], atol=1e-15)
        x, w = np.concatenate([gauss, new]), np.concatenate([w_g, w_new])
        assert len(new) == n + 1 and (w > 0).all() and ((0 < x) & (x < 1)).all()
        for deg in range(3 * n + 2 + n % 2):
            assert (w * x**deg).sum() == pytest.approx(1 / (deg + 1), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="Kronrod extension"):
        kronrod(17)


def test_kronrod_refinement_in_batch_equals_the_kronrod_rule(pair, sae) -> None:
    """A document missing max_rel_error gets the Kronrod extension in the batch: its attributions equal the
    (2n + 1)-point rule run from scratch, the others' equal the plain Gauss rule, and completeness improves."""
    base, ft = pair
    ids_BT, mask_BT = right_padded()
    gl = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=3, rule="gauss_legendre")
    errors = completeness_errors(gl)
    tol = float(np.sort(errors)[1]) * 0.999  # the two worst documents miss it, the best one passes
    ref = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=3, rule="gauss_kronrod")
    got = attribute_batch(base, ft, LAYER, ids_BT, mask_BT, sae, steps=3, rule="gauss_legendre", max_rel_error=tol)
    redo = errors > tol
    assert redo.sum() == 2 and list(got.steps_B) == [7 if r else 3 for r in redo]
    assert (completeness_errors(got)[redo] < errors[redo]).all()
    for b in range(len(LENGTHS)):
        want = ref if redo[b] else gl
        assert_same_but_batch(got.attribution[got.batch_idx == b], want.attribution[want.batch_idx == b])
