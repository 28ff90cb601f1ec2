"""Tests of the BatchTopK SAE (`diffsae.sae`), its training loop (`diffsae.train`) and the shuffle loader.

The training step is checked against a naive dense re-implementation written here from scratch (sorting for
the batch top-k, loops for AuxK and the gradient projection, the Adam formula by hand).
"""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from diffsae.config import SAEConfig
from diffsae.sae import BatchTopKSAE, batch_topk
from diffsae.shuffle import interleave, shuffle_rows, shuffled_batches
from diffsae.train import SAETrainer, calibrate_threshold, estimate_scale, evaluate, train_sae

PARAMS = ("W_enc_DF", "b_enc_F", "W_dec_FD", "b_dec_D")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine is small and shared: one intra-op thread keeps timings stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- naive reference
def naive_step(p: dict, adam: dict, x_BD, scale, k, lr, alpha, dead_tokens, aux_k, since_F, ema: dict) -> dict:
    """One training step, dense and plain. Mutates p, adam, since_F, ema; returns the losses."""
    W_enc, b_enc, W_dec, b_dec = (p[n].clone().requires_grad_(True) for n in PARAMS)
    B, F = x_BD.shape[0], W_enc.shape[1]
    xs = x_BD * scale
    post = torch.relu((xs - b_dec) @ W_enc + b_enc)
    flat = post.detach().flatten().tolist()
    keep = sorted(range(B * F), key=lambda i: -flat[i])[: k * B]
    mask = torch.zeros(B * F)
    mask[keep] = 1.0
    acts = post * mask.view(B, F)
    err = xs - (acts @ W_dec + b_dec)
    mse = (err**2).sum(dim=1).mean()
    for f in range(F):
        since_F[f] = 0 if bool((acts[:, f] > 0).any()) else since_F[f] + B
    dead = [f for f in range(F) if since_F[f] >= dead_tokens]
    auxk = torch.tensor(0.0)
    if dead:
        aux_mask = torch.zeros(B, F)
        for b in range(B):
            ranked = sorted(dead, key=lambda f: -float(post[b, f].detach()))[: min(aux_k, len(dead))]
            aux_mask[b, ranked] = 1.0
        e = err.detach()
        e_hat = (post * aux_mask) @ W_dec
        auxk = ((e - e_hat) ** 2).sum(dim=1).mean() / ((e - e.mean(dim=0)) ** 2).sum(dim=1).mean()
    (mse + alpha * auxk).backward()
    grads = {
        "W_enc_DF": W_enc.grad,
        "b_enc_F": b_enc.grad,
        "W_dec_FD": W_dec.grad.clone(),
        "b_dec_D": b_dec.grad,
    }
    for f in range(F):
        u = W_dec[f].detach() / W_dec[f].detach().norm()
        grads["W_dec_FD"][f] -= torch.dot(grads["W_dec_FD"][f], u) * u
    adam["t"] += 1
    t = adam["t"]
    for n in PARAMS:
        g = grads[n]
        adam["m"][n] = 0.9 * adam["m"][n] + 0.1 * g
        adam["v"][n] = 0.999 * adam["v"][n] + 0.001 * g * g
        m_hat, v_hat = adam["m"][n] / (1 - 0.9**t), adam["v"][n] / (1 - 0.999**t)
        p[n] = p[n] - lr * m_hat / (v_hat.sqrt() + 1e-8)
    p["W_dec_FD"] = p["W_dec_FD"] / p["W_dec_FD"].norm(dim=1, keepdim=True)
    kept = acts.detach()[acts.detach() > 0]
    ema["n"] += 1
    ema["value"] = ema["beta"] * ema["value"] + (1 - ema["beta"]) * float(kept.min())
    p["threshold"] = ema["value"] / (1 - ema["beta"] ** ema["n"])
    return {"mse": float(mse.detach()), "auxk": float(auxk.detach())}


def test_training_steps_match_naive_reimplementation():
    d, F, k, B, lr, dead_tokens = 6, 12, 2, 5, 1e-3, 7
    cfg = SAEConfig(n_latents=F, k=k, batch_size=B, lr=lr, dead_tokens=dead_tokens, seed=3, device="cpu")
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(40, d, generator=gen) * 3 + 1
    tr = SAETrainer(cfg, d, sample, total_steps=20, threshold_horizon=4)
    with torch.no_grad():
        tr.sae.b_enc_F.copy_(0.1 * torch.randn(F, generator=gen))
    tr.tokens_since_fired_F.fill_(dead_tokens)  # every latent that does not fire in step 1 is dead
    p = {n: getattr(tr.sae, n).detach().clone() for n in PARAMS}
    adam = {
        "t": 0,
        "m": {n: torch.zeros_like(p[n]) for n in PARAMS},
        "v": {n: torch.zeros_like(p[n]) for n in PARAMS},
    }
    since = [dead_tokens] * F
    ema = {"beta": tr.threshold_beta, "value": 0.0, "n": 0}
    scale = float(tr.sae.scale)
    assert tr.aux_k == d // 2
    for step in range(3):
        x = torch.randn(B, d, generator=gen) * 3 + 1
        ours = tr.step(x)
        ref = naive_step(p, adam, x, scale, k, lr, cfg.auxk_alpha, dead_tokens, 3, since, ema)
        if step == 0:
            assert ref["auxk"] > 0 and float(ours["auxk_loss"]) > 0  # the AuxK path is exercised
        assert float(ours["mse"]) == pytest.approx(ref["mse"], rel=1e-5)
        assert float(ours["auxk_loss"]) == pytest.approx(ref["auxk"], rel=1e-5, abs=1e-7)
        for n in PARAMS:
            torch.testing.assert_close(getattr(tr.sae, n).detach(), p[n], atol=1e-5, rtol=0, msg=f"{n} step {step}")
        assert float(tr.sae.threshold) == pytest.approx(p["threshold"], abs=1e-6)
        assert tr.tokens_since_fired_F.tolist() == since
    torch.testing.assert_close(tr.sae.W_dec_FD.norm(dim=1), torch.ones(F))


def test_init_scale_and_decoder():
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(500, 8, generator=gen) * 5 + 2
    scale = estimate_scale(sample)
    assert (sample * scale).pow(2).sum(dim=1).mean().item() == pytest.approx(1.0, rel=1e-6)
    tr = SAETrainer(SAEConfig(n_latents=16, k=2, device="cpu"), 8, sample, total_steps=10)
    sae = tr.sae
    assert float(sae.scale) == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(sae.b_dec_D, sample.mean(dim=0) * scale)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(sae.W_enc_DF, sae.W_dec_FD.t())
    assert estimate_scale(torch.zeros(3, 4)) == 1.0


# --------------------------------------------------------------------------------------- hand-computed cases
def test_batch_topk_hand_computed():
    pre = torch.tensor([[3.0, -1.0, 0.5], [2.0, 4.0, -0.1]])
    for hint in (0.0, 1.0, 2.5, 10.0):  # the hint only changes speed, never the answer
        assert batch_topk(pre, 2, hint).flat_N.tolist() == [0, 4]
        top = batch_topk(pre, 3, hint, mask_buf=torch.empty(6, dtype=torch.bool))
        assert top.flat_N.tolist() == [0, 3, 4] and top.vals_N.tolist() == [3.0, 2.0, 4.0]
        assert batch_topk(pre, 6, hint).flat_N.tolist() == [0, 2, 3, 4]  # only 4 positive entries


def small_sae(scale: float = 1.0, threshold: float = 0.0) -> BatchTopKSAE:
    sae = BatchTopKSAE(2, 3, k=1)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]]))
        sae.W_dec_FD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
        sae.scale.fill_(scale)
        sae.threshold.fill_(threshold)
    return sae


def test_calibrate_threshold_hand_computed():
    # scaled pre (ReLU) = [[2, 6, 5], [10, 0, 8]]; k = 1 keeps 2 values of 4 positive: 10 and 8 -> cut at 6
    sae = small_sae(scale=2.0, threshold=0.0)
    x = torch.tensor([[1.0, 3.0], [5.0, -2.0]])
    assert calibrate_threshold(sae, [x[:1], x[1:]], k=1) == 6.0
    assert sae.encode(x).tolist() == [[0.0, 0.0, 0.0], [10.0, 0.0, 8.0]]


@pytest.mark.parametrize("k", [1, 4, 32])
def test_calibrate_threshold_matches_full_sort(k):
    """Equal to the (k*N + 1)-th largest of all N x F values, also when a few tokens carry most of the mass (the
    per-token truncation must grow)."""
    gen = torch.Generator().manual_seed(k)
    sae = BatchTopKSAE(16, 256, k=k, seed=1)
    x_ND = torch.randn(300, 16, generator=gen)
    x_ND[:5] *= 40.0  # five tokens with far more than 4k values above the cut
    want = torch.sort(sae.pre_acts(x_ND).relu().flatten(), descending=True).values[k * 300]
    got = calibrate_threshold(sae, x_ND.split(64), k=k, chunk_tokens=50)
    assert got == pytest.approx(float(want), rel=1e-6)
    assert evaluate(sae, [x_ND]).l0 == pytest.approx(k, abs=1 / 300)


def test_batch_topk_forward_hand_computed():
    # pre = [[1, 3, 2.5], [5, -2, 4]]: the 2 = k * B largest are both in token 1, none in token 0
    fw = small_sae().encode_train(torch.tensor([[1.0, 3.0], [5.0, -2.0]]))
    assert fw.codes.rows_N.tolist() == [1, 1] and fw.codes.cols_N.tolist() == [0, 2]
    assert fw.vals_N.tolist() == [5.0, 4.0]
    torch.testing.assert_close(fw.x_hat_s_BD, torch.tensor([[0.0, 0.0], [5.0 + 2.4, 3.2]]))


def test_threshold_inference_hand_computed():
    sae = small_sae(scale=2.0, threshold=2.6)  # scaled pre = [[2, 6, 5], [10, -4, 8]]
    acts = sae.encode(torch.tensor([[1.0, 3.0], [5.0, -2.0]]))
    torch.testing.assert_close(acts, torch.tensor([[0.0, 6.0, 5.0], [10.0, 0.0, 8.0]]))
    x_hat = sae.decode(acts)  # (acts @ W_dec) / scale
    torch.testing.assert_close(x_hat, torch.tensor([[1.5, 5.0], [7.4, 3.2]]))
    sae.threshold.fill_(-5.0)  # a negative threshold still applies the ReLU
    assert sae.encode(torch.tensor([[-1.0, -1.0]])).tolist() == [[0.0, 0.0, 0.0]]


# -------------------------------------------------------------------------------- round trips, save/load
def test_encode_decode_round_trip_with_scale():
    d = 4
    sae = BatchTopKSAE(d, 2 * d, k=d)
    with torch.no_grad():  # latents +e_i and -e_i: relu(3x) - relu(-3x) = 3x exactly
        eye = torch.eye(d)
        sae.W_enc_DF.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
        sae.scale.fill_(3.0)
    x = torch.randn(10, d)
    acts = sae.encode(x)
    torch.testing.assert_close(acts[:, :d], torch.relu(3 * x))
    torch.testing.assert_close(sae.decode(acts), x)
    torch.testing.assert_close(sae(x), x)


def test_save_load_round_trip(tmp_path):
    sae = BatchTopKSAE(5, 7, k=2, seed=4)
    with torch.no_grad():
        sae.b_enc_F.normal_()
        sae.b_dec_D.normal_()
        sae.threshold.fill_(0.37)
        sae.scale.fill_(2.5)
    sae.save(tmp_path / "sae", metadata={"layer": 2, "base_model": "m"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "batchtopk" and (cfg["d_in"], cfg["n_latents"], cfg["k"]) == (5, 7, 2)
    assert cfg["threshold"] == pytest.approx(0.37) and cfg["scale"] == 2.5 and cfg["layer"] == 2
    loaded = BatchTopKSAE.load(tmp_path / "sae", device="cpu")
    assert loaded.metadata == {"layer": 2, "base_model": "m"}
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    x = torch.randn(6, 5)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="override"):
        sae.save(tmp_path / "bad", metadata={"k": 3})
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(ValueError, match="architecture"):
        BatchTopKSAE.load(tmp_path / "sae")


# ------------------------------------------------------------------------------------ training on sparse data
def sparse_data(n: int, d: int, n_dirs: int, k: int, seed: int) -> torch.Tensor:
    """Rows = positive combinations of k of n_dirs random unit directions, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_dirs, generator=gen).topk(k, dim=1).indices
    coef = 0.5 + torch.rand(n, k, generator=gen)
    return torch.einsum("nk,nkd->nd", coef, dirs[idx]) * 3.0 + 0.5


def test_training_recovers_sparse_data():
    k, batch = 8, 512
    data = sparse_data(24576 + 4096, d=128, n_dirs=256, k=k, seed=0)
    train, val = data[:24576], data[24576:]
    cfg = SAEConfig(n_latents=256, k=k, batch_size=batch, lr=2e-3, dead_tokens=20 * batch, seed=0, device="cpu")

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            yield from (train[i] for i in torch.randperm(len(train), generator=gen).split(batch))

    logged: list[tuple[int, dict[str, float]]] = []
    t0 = time.perf_counter()
    res = train_sae(
        cfg,
        batches(),
        128,
        train[:4096],
        500,
        on_step=lambda s, m: logged.append((s, m)),
        progress=False,
        log_every=100,
    )
    elapsed = time.perf_counter() - t0
    assert (res.steps, res.tokens) == (500, 500 * batch)
    assert [s for s, _ in logged] == [100, 200, 300, 400, 500]
    assert set(logged[-1][1]) >= {"loss", "mse", "fvu", "l0", "dead_fraction", "auxk_loss", "tokens_per_s"}
    assert logged[-1][1]["l0"] == pytest.approx(k) and logged[-1][1]["fvu"] < logged[0][1]["fvu"]
    ev = evaluate(res.sae, val.split(1000))
    assert ev.n_tokens == len(val)
    assert ev.fvu < 0.1, ev
    assert abs(ev.l0 - k) / k < 0.05, ev
    assert ev.dead_fraction < 0.05, ev
    print(f"trained 500 steps in {elapsed:.1f}s: {ev}")


def test_train_sae_stops_when_batches_run_out():
    data = torch.randn(10 * 64, 16)
    cfg = SAEConfig(n_latents=32, k=4, batch_size=64, lr=1e-3, device="cpu")
    logged: list[int] = []
    res = train_sae(
        cfg, data.split(64), 16, data, 100, on_step=lambda s, m: logged.append(s), progress=False, log_every=4
    )
    assert res.steps == 10 and res.tokens == 640 and logged == [4, 8, 10]
    assert math.isfinite(res.final_train_metrics["fvu"])
    with pytest.raises(ValueError, match="no training batches"):
        train_sae(cfg, [], 16, data, 5, progress=False)


# --------------------------------------------------------------------------------------------------- shuffle
def tagged_chunks(n_chunks: int, rows: int, counter: list[int] | None = None):
    """Chunk c holds rows [c, i, c * 1000 + i]: each row is unique and says where it came from."""
    for c in range(n_chunks):
        if counter is not None:
            counter[0] += rows
        i = np.arange(rows)
        yield np.stack([np.full(rows, c), i, c * 1000 + i], axis=1).astype(np.float32)


def test_shuffle_every_row_exactly_once_and_mixed():
    got = list(shuffled_batches(tagged_chunks(20, 50), batch_size=32, buffer_rows=200, seed=0, drop_last=False))
    assert all(b.shape == (32, 3) and b.dtype == torch.float32 for b in got[:-1]) and len(got[-1]) == 1000 % 32
    rows = torch.cat(got)
    expected = np.concatenate(list(tagged_chunks(20, 50)))
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected.tolist()))
    chunk_ids = [set(b[:, 0].long().tolist()) for b in got]
    assert min(len(s) for s in chunk_ids[:-1]) >= 3  # every batch mixes several chunks
    assert not torch.equal(rows[:, 2], torch.sort(rows[:, 2]).values)
    dropped = list(shuffled_batches(tagged_chunks(20, 50), batch_size=32, buffer_rows=200, seed=0))
    assert len(dropped) == 1000 // 32 and all(len(b) == 32 for b in dropped)


def test_shuffle_float16_chunks_give_float32_batches():
    chunks = [np.arange(40, dtype=np.float16).reshape(20, 2), np.arange(40, 80, dtype=np.float16).reshape(20, 2)]
    got = torch.cat(list(shuffled_batches(iter(chunks), batch_size=8, buffer_rows=12, seed=0, drop_last=False)))
    assert got.dtype == torch.float32 and sorted(got[:, 0].tolist()) == list(range(0, 80, 2))


def test_shuffle_is_seeded():
    a = [b.tolist() for b in shuffle_rows(tagged_chunks(10, 30), 16, 64, seed=5)]
    b = [b.tolist() for b in shuffle_rows(tagged_chunks(10, 30), 16, 64, seed=5)]
    c = [b.tolist() for b in shuffle_rows(tagged_chunks(10, 30), 16, 64, seed=6)]
    assert a == b and a != c


def test_shuffle_propagates_producer_exceptions():
    def bad_chunks():
        yield from tagged_chunks(3, 40)
        raise OSError("shard-00003.parquet: truncated")

    with pytest.raises(OSError, match="truncated"):
        for _ in shuffled_batches(bad_chunks(), batch_size=8, buffer_rows=16, seed=0):
            pass
    with pytest.raises(ValueError, match="width"):
        list(shuffled_batches(iter([np.zeros((4, 3)), np.zeros((4, 2))]), 2, 2, seed=0))


def test_shuffle_memory_is_bounded():
    """The producer never pulls more than buffer + one chunk + the batches in flight ahead of the consumer."""
    pulled = [0]
    batch, buffer_rows, chunk_rows, prefetch = 16, 128, 40, 2
    stream = shuffled_batches(tagged_chunks(200, chunk_rows, pulled), batch, buffer_rows, seed=0, prefetch=prefetch)
    consumed = 0
    for x in stream:
        consumed += len(x)
        time.sleep(0.0005)  # a slow consumer: the producer runs ahead as far as it may
        assert pulled[0] - consumed <= buffer_rows + chunk_rows + (prefetch + 2) * batch
    assert consumed == 200 * chunk_rows // batch * batch


def test_shuffle_stops_producer_when_consumer_closes():
    stream = shuffled_batches(tagged_chunks(10_000, 10), batch_size=4, buffer_rows=8, seed=0)
    next(stream)
    stream.close()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "diffsae-shuffle"]


def test_interleave_round_robin_in_seeded_random_order():
    its = [[("a", i) for i in range(3)], [("b", i) for i in range(1)], [("c", i) for i in range(2)]]
    out = list(interleave(its, seed=0))
    assert sorted(out) == sorted(x for it in its for x in it)
    assert {name for name, _ in out[:3]} == {"a", "b", "c"}  # first round: one from each
    assert {name for name, _ in out[3:5]} == {"a", "c"} and out[5] == ("a", 2)
    orders = {tuple(name for name, _ in interleave(its, seed=s))[:3] for s in range(20)}
    assert len(orders) > 1 and list(interleave(its, seed=3)) == list(interleave(its, seed=3))


def test_calibration_split_is_disjoint_seeded_and_never_validation():
    from diffsae.split import split_calibration, split_docs

    train, val = split_docs(200, 0.1, seed=3)
    fit, cal = split_calibration(train, 0.1, seed=3)
    assert set(fit).isdisjoint(cal) and set(fit) | set(cal) == set(train) and set(cal).isdisjoint(val)
    assert 5 <= len(cal) <= 40
    again = split_calibration(train, 0.1, seed=3)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], cal)
    assert [len(x) for x in split_calibration(np.arange(2), 0.01, seed=0)] == [1, 1]  # at least one of each
    same = split_calibration(train, 0.0, seed=3)
    assert np.array_equal(same[0], train) and np.array_equal(same[1], train)  # fraction 0: train docs do both
