"""Benchmark: diffsae's BatchTopK trainer against dictionary_learning's `BatchTopKTrainer` (PyPI 0.1.0).

Both train on the same activations (synthetic sparse data, or the `diff` column of activation shards with
`--parquet DIR`), in the same batch order, with the same width, k, batch size, steps, lr, AuxK weight and
dead-token window, alternating one step of each so that machine load hits both alike. Printed: steady-state
tokens/s of both (the first `--warmup` steps excluded), their ratio (ours / theirs), and validation FVU of
both, with the batch top-k encoder (L0 = k exactly, the like-for-like comparison) and with each one's
inference threshold encoder (with its L0).

dictionary_learning's package `__init__` imports nnsight, so it is installed without dependencies into a side
folder and its trainer module is imported by path under stub parent packages:

    .venv/bin/pip install --no-deps --target .cache/bench-deps dictionary-learning==0.1.0 einops==0.8.2
    .venv/bin/python bench/sae.py                  # synthetic d=128, F=4096, k=32, batch 2048, 200 steps
    .venv/bin/python bench/sae.py --parquet <store>/runs/demo/activations --steps 500

With `--init shared` (default) ours starts from dictionary_learning's initial weights and b_dec (the geometric
median of the first batch; ours alone would use the mean of a sample), so the FVUs compare the training
algorithms, not initialisation luck. What still differs: dictionary_learning clips the gradient norm to 1 (not
reached on these runs), and its inference threshold is an EMA with beta 0.999 from step min(1000, steps // 10)
(ours: bias-corrected, horizon min(1000, steps // 10)), so its threshold-encoder L0 can be far from k on short
runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffsae.config import SAEConfig  # noqa: E402
from diffsae.train import SAETrainer, estimate_scale, evaluate  # noqa: E402


def load_dictionary_learning(deps: Path) -> types.ModuleType:
    """`dictionary_learning.trainers.batch_top_k` from `deps`, without running the package `__init__`s."""
    root = deps / "dictionary_learning"
    if not (root / "trainers" / "batch_top_k.py").is_file():
        sys.exit(
            f"dictionary_learning not found under {deps}; install it with:\n"
            f"  .venv/bin/pip install --no-deps --target {deps} dictionary-learning==0.1.0 einops==0.8.2"
        )
    sys.path.insert(0, str(deps))  # einops
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    return importlib.import_module("dictionary_learning.trainers.batch_top_k")


def synthetic(n: int, d: int, n_features: int, k_true: int, seed: int) -> Tensor:
    """n rows, each a positive combination of k_true of n_features random unit directions, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    dirs_GD = torch.randn(n_features, d, generator=gen)
    dirs_GD /= dirs_GD.norm(dim=1, keepdim=True)
    x_ND = torch.empty(n, d)
    for start in range(0, n, 8192):
        m = min(8192, n - start)
        idx_MK = torch.rand(m, n_features, generator=gen).topk(k_true, dim=1).indices  # [M, k_true]
        coef_MK = torch.rand(m, k_true, generator=gen) + 0.5
        x_ND[start : start + m] = torch.einsum("mk,mkd->md", coef_MK, dirs_GD[idx_MK])
    return x_ND + 0.02 * torch.randn(n, d, generator=gen)


def read_parquet_diffs(folder: Path, max_rows: int) -> Tensor:
    import pyarrow.parquet as pq

    parts, n = [], 0
    for shard in sorted(folder.glob("shard-*.parquet")):
        col = pq.read_table(shard, columns=["diff"]).column("diff").combine_chunks()
        d = col.type.list_size
        parts.append(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d))
        n += len(parts[-1])
        if n >= max_rows:
            break
    if not parts:
        sys.exit(f"no shard-*.parquet with a `diff` column in {folder}")
    return torch.from_numpy(np.concatenate(parts)[:max_rows])


class FVU(NamedTuple):
    fvu: float
    l0: float


@torch.no_grad()
def fvu_of(encode_decode: Callable[[Tensor], tuple[Tensor, Tensor]], val_ND: Tensor, batch: int) -> FVU:
    """FVU and L0 over val_ND; encode_decode(x) -> (x_hat in the units of x, acts)."""
    sse, nnz = 0.0, 0
    for x_BD in val_ND.split(batch):
        x_hat_BD, acts_BF = encode_decode(x_BD)
        sse += float((x_BD - x_hat_BD).double().pow(2).sum())
        nnz += int((acts_BF > 0).sum())
    var = float((val_ND.double() - val_ND.double().mean(0)).pow(2).sum())
    return FVU(sse / var, nnz / len(val_ND))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parquet", type=Path, help="activation shards folder (diff column); default synthetic")
    ap.add_argument("--d", type=int, default=128, help="synthetic input width")
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--init",
        choices=("shared", "own"),
        default="shared",
        help="shared: ours starts from dictionary_learning's initial weights and b_dec (isolates the "
        "algorithm from initialisation luck, worth tens of percent of FVU on short runs); own: each its own",
    )
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--lr", type=float, default=4e-4, help="default: dictionary_learning's rule for F=4096")
    ap.add_argument("--train-tokens", type=int, default=262144, help="distinct training rows (cycled)")
    ap.add_argument("--val-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deps", type=Path, default=ROOT / ".cache" / "bench-deps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dl = load_dictionary_learning(args.deps)
    device = torch.device(args.device)

    n_rows = args.train_tokens + args.val_tokens
    if args.parquet:
        data_ND = read_parquet_diffs(args.parquet, n_rows)
        data_ND = data_ND[torch.randperm(len(data_ND), generator=torch.Generator().manual_seed(args.seed))]
        source = f"parquet {args.parquet}"
    else:
        data_ND = synthetic(n_rows, args.d, 16 * args.d, 16, args.seed)
        source = f"synthetic (16 of {16 * args.d} unit directions per row)"
    val_ND, train_ND = data_ND[: args.val_tokens], data_ND[args.val_tokens :]
    if len(train_ND) < args.batch:
        sys.exit(f"need at least {args.batch} training rows, got {len(train_ND)}")
    d_in = train_ND.shape[1]
    print(f"data: {source}: {len(train_ND)} train / {len(val_ND)} val rows, d={d_in}")
    print(
        f"config: F={args.n_latents} k={args.k} batch={args.batch} steps={args.steps} lr={args.lr} "
        f"threads={args.threads} device={device} init={args.init}"
    )

    cfg = SAEConfig(n_latents=args.n_latents, k=args.k, batch_size=args.batch, lr=args.lr, seed=args.seed)
    ours = SAETrainer(cfg, d_in, train_ND[:16384], args.steps, device=device)
    scale = estimate_scale(train_ND[:16384])
    theirs = dl.BatchTopKTrainer(
        steps=args.steps,
        activation_dim=d_in,
        dict_size=args.n_latents,
        k=args.k,
        layer=0,
        lm_name="bench",
        lr=args.lr,
        auxk_alpha=cfg.auxk_alpha,
        warmup_steps=0,
        threshold_start_step=min(1000, args.steps // 10),
        seed=args.seed,
        device=str(device),
    )
    theirs.dead_feature_threshold = cfg.dead_tokens
    if args.init == "shared":
        with torch.no_grad():
            ours.sae.W_dec_FD.copy_(theirs.ae.decoder.weight.t())
            ours.sae.W_enc_DF.copy_(theirs.ae.encoder.weight.t())
            ours.sae.b_enc_F.copy_(theirs.ae.encoder.bias)
            # what theirs.update(0, ...) sets: the geometric median of the first (scaled) batch
            ours.sae.b_dec_D.copy_(theirs.geometric_median(train_ND[: args.batch].to(device) * scale))

    n_batches = len(train_ND) // args.batch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_ours = t_theirs = 0.0
    for step in range(args.steps):
        x_BD = train_ND[(step % n_batches) * args.batch : (step % n_batches + 1) * args.batch].to(device)
        sync()
        t0 = time.perf_counter()
        ours.step(x_BD)
        sync()
        t1 = time.perf_counter()
        theirs.update(step, x_BD * scale)
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            t_ours += t1 - t0
            t_theirs += t2 - t1
    timed_tokens = (args.steps - args.warmup) * args.batch
    tps_ours, tps_theirs = timed_tokens / t_ours, timed_tokens / t_theirs

    sae, ae = ours.sae, theirs.ae
    val_dev = val_ND.to(device)

    def ours_topk(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        fw = sae.encode_train(x_BD)
        return fw.x_hat_s_BD / sae.scale, fw.vals_N

    def theirs_topk(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        acts_BF = ae.encode(x_BD * scale, use_threshold=False)
        return ae.decode(acts_BF) / scale, acts_BF

    def theirs_thr(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        acts_BF = ae.encode(x_BD * scale)
        return ae.decode(acts_BF) / scale, acts_BF

    o_topk, t_topk = fvu_of(ours_topk, val_dev, args.batch), fvu_of(theirs_topk, val_dev, args.batch)
    o_thr = evaluate(sae, val_dev.split(args.batch))
    t_thr = fvu_of(theirs_thr, val_dev, args.batch)
    rel = (o_topk.fvu - t_topk.fvu) / t_topk.fvu
    print(
        f"tokens/s  ours {tps_ours:10.0f}   dictionary_learning {tps_theirs:10.0f}   ratio {tps_ours / tps_theirs:.2f}"
    )
    print(
        f"FVU batch-top-k (L0={args.k})  ours {o_topk.fvu:.4f}   dictionary_learning {t_topk.fvu:.4f}   "
        f"relative difference {100 * rel:+.1f}%"
    )
    print(
        f"FVU threshold encoder   ours {o_thr.fvu:.4f} (L0 {o_thr.l0:.1f})   "
        f"dictionary_learning {t_thr.fvu:.4f} (L0 {t_thr.l0:.1f})"
    )


if __name__ == "__main__":
    main()
