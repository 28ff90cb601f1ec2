"""Benchmark: training throughput of the BatchTopK crosscoder (diffsae/crosscoder.py) against the diff-SAE at equal
width and k, in one run.

dictionary_learning 0.1.0 (the PyPI release bench/sae.py compares with) has no crosscoder trainer, so the yardstick
is the project's own diff-SAE trainer (`diffsae.train.SAETrainer`), as issue 17 asks. Both train on the same
synthetic pairs: h_base a sparse mix of shared unit directions, h_ft = h_base + a sparse mix of finetune-only
directions (what a diff-SAE sees is the second term alone; a crosscoder sees both residuals). One step of each in
turn, so that machine load hits both alike; printed: steady-state tokens/s of each (the first `--warmup` steps
excluded; median over steps with the 10th-90th percentile), the ratio, and validation FVU — of the crosscoder on
the pair, and of both on the diff (the crosscoder's diff is x̂_ft − x̂_base), with each one's batch top-k encoder.

    .venv/bin/python bench/crosscoder.py                          # d=128, F=2048, k=32, batch 1024, 100 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffsae.config import SAEConfig  # noqa: E402
from diffsae.crosscoder import CrossCoderTrainer  # noqa: E402
from diffsae.train import SAETrainer  # noqa: E402


def pairs(n: int, d: int, n_shared: int, n_ft: int, seed: int) -> Tensor:
    """[n, 2, d]: base = 16 of n_shared shared unit directions per row, ft = base + 4 of n_ft finetune-only ones."""
    g = torch.Generator().manual_seed(seed)

    def mix(n_dirs: int, active: int) -> Tensor:
        dirs = torch.randn(n_dirs, d, generator=g)
        dirs /= dirs.norm(dim=1, keepdim=True)
        idx = torch.rand(n, n_dirs, generator=g).topk(active, dim=1).indices
        coef = torch.zeros(n, n_dirs).scatter(1, idx, torch.rand(n, active, generator=g) + 0.5)
        return coef @ dirs

    base = mix(n_shared, 16)
    return torch.stack([base, base + 0.5 * mix(n_ft, 4)], dim=1)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = pairs(args.batch * 32 + 8192, args.d, 16 * args.d, 4 * args.d, args.seed)
    val, train = data[:8192], data[8192:]
    cfg = SAEConfig(n_latents=args.n_latents, k=args.k, lr=args.lr, device="cpu")
    sae_tr = SAETrainer(cfg, args.d, train[:4096, 1] - train[:4096, 0], total_steps=args.steps)
    cc_tr = CrossCoderTrainer(args.d, args.n_latents, args.k, train[:4096], lr=args.lr)
    t_sae, t_cc = [], []
    for step in range(args.steps):
        rows = torch.arange(step * args.batch, (step + 1) * args.batch) % len(train)
        x = train[rows]
        t0 = time.perf_counter()
        sae_tr.step(x[:, 1] - x[:, 0])
        t1 = time.perf_counter()
        cc_tr.step(x)
        t2 = time.perf_counter()
        if step >= args.warmup:
            t_sae.append(args.batch / (t1 - t0))
            t_cc.append(args.batch / (t2 - t1))

    with torch.no_grad():
        diff = val[:, 1] - val[:, 0]
        sae = sae_tr.sae
        sae_fw = sae.encode_train(diff)
        sae_fvu = fvu(sae_fw.x_s_BD, sae_fw.x_hat_s_BD)
        cc = cc_tr.cc
        x_s, _, acts = cc.encode_train(val)
        xhat_s = cc.decode_scaled(acts)
        cc_fvu = fvu(x_s.flatten(1), xhat_s.flatten(1))
        xhat = xhat_s / cc.scale_M[None, :, None]
        cc_diff_fvu = fvu(diff, xhat[:, 1] - xhat[:, 0])
        sae_diff_fvu = fvu(diff, sae_fw.x_hat_s_BD / sae.scale)

    def stats(v: list[float]) -> str:
        return f"{np.median(v):9.0f} tokens/s (p10-p90 {np.percentile(v, 10):.0f}-{np.percentile(v, 90):.0f})"

    print(f"d={args.d} F={args.n_latents} k={args.k} batch={args.batch} steps={args.steps} threads={args.threads}")
    print(f"diff-SAE   : {stats(t_sae)}  val FVU on the diff {sae_diff_fvu:.3f} (scaled units {sae_fvu:.3f})")
    print(f"crosscoder : {stats(t_cc)}  val FVU on the pair {cc_fvu:.3f}, on the diff {cc_diff_fvu:.3f}")
    ratios = np.array(t_cc) / np.array(t_sae)
    print(f"crosscoder / diff-SAE throughput: {np.median(ratios):.2f}x "
          f"(per-step p10-p90 {np.percentile(ratios, 10):.2f}-{np.percentile(ratios, 90):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
