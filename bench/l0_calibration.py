"""Inference L0 on held-out documents: how far from k, and how much of that is the calibration sample.

What: on a finished run (its SAE and its activations on the store), the documents the SAE never trained on
(`diffsae.split.heldout_docs`: the calibration and validation documents) are split at random `--repeats` times into
a calibration part (a share `--cal-share` of them) and the rest; each time the inference threshold is calibrated on
the first part exactly as the training stage does (`diffsae.train.calibrate_threshold`: mean L0 = k there) and the
mean L0 is measured on the rest. Prints the run's own split (what `sae/metrics.json` reports as `l0`), the
training stage's two-fold cross-fitted L0 (`l0_crossfit`, `diffsae.train.crossfit_l0`) and its distribution over
random halvings, and, per share, the distribution of L0 / k over random single splits (random, or stratified by
each document's mean diff norm): median, 5-95 % range, and the share of splits within 10 % of k.

Why: the issue's criterion is L0 within 10 % of k on held-out tokens; whether a miss is a bias of the rule or the
noise of calibrating on ~10 documents decides the fix (more calibration documents, or a different rule).

    python bench/l0_calibration.py --config examples/smollm2.yaml --store /tmp/s2store
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffsae.config import PipelineConfig
from diffsae.split import heldout_docs, sae_splits
from diffsae.train import crossfit_l0
from storage import activations as act
from storage.context import RunContext
from tasks.attribute import load_sae


def cut_for(pre_NF: torch.Tensor, k: int) -> float:
    """The (k*N + 1)-th largest post-ReLU pre-activation of N tokens: calibrate_threshold's rule, dense."""
    flat = pre_NF.flatten()
    n_keep = k * pre_NF.shape[0]
    return float(flat.kthvalue(flat.numel() - n_keep).values) if n_keep < flat.numel() else 0.0


def stratified_flags(n: int, n_cal: int, rng: np.random.Generator) -> np.ndarray:
    """Calibration flags over n documents sorted by the covariate: a systematic sample of n_cal (random phase),
    each flag then swapped with its sorted neighbour at random (diffsae.split.stratified_split's rule)."""
    r, u = n_cal / n, rng.random()
    i = np.arange(n)
    flags = np.floor((i + 1) * r + u) > np.floor(i * r + u)
    for j in range(0, n - 1, 2):
        if rng.random() < 0.5:
            flags[j], flags[j + 1] = flags[j + 1], flags[j]
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--run", default=None, help="the run's name, if not the config's")
    ap.add_argument("--cal-share", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    overrides = {key: v for key, v in (("store", args.store), ("run", args.run)) if v}
    cfg = PipelineConfig.from_yaml(args.config, overrides)
    ctx = RunContext.from_config(cfg)
    manifest = act.read_manifest(ctx.store, ctx.paths)
    if manifest is None:
        raise SystemExit(f"no finished activations stage in {ctx.paths.url('activations')}")
    n_docs = int(manifest["n_docs"])
    sae = load_sae(ctx, "cpu")
    k = cfg.sae.k
    splits = sae_splits(n_docs, cfg.sae)
    held = heldout_docs(n_docs, cfg.sae)

    # the held-out documents' diffs as the training stage reads them for `l0_crossfit` (its row cap and seed)
    by_doc = act.read_diffs_by_doc(ctx.store, ctx.paths, manifest, held, 2 * cfg.sae.calibration_tokens, cfg.sae.seed)
    with torch.no_grad():  # post-ReLU pre-activations [n, F], and each document's mean diff norm (stratification)
        pre = {d: sae.pre_acts(torch.from_numpy(x)).relu() for d, x in by_doc.items()}
    norm = {d: float(np.linalg.norm(x, axis=1).mean()) for d, x in by_doc.items()}
    docs = np.array(sorted(pre))
    n_tok = {d: pre[d].shape[0] for d in docs}

    def l0(doc_ids: np.ndarray, cut: float) -> float:
        return float(sum(int((pre[d] > cut).sum()) for d in doc_ids) / sum(n_tok[d] for d in doc_ids))

    def calibrated(doc_ids: np.ndarray) -> float:
        return max(cut_for(torch.cat([pre[d] for d in doc_ids]), k), 0.0)

    cal, val = np.intersect1d(splits["calibration"], docs), np.intersect1d(splits["validation"], docs)
    cut = calibrated(cal)
    print(f"run {cfg.run}: k {k}, {sae.W_dec_FD.shape[0]} latents; held-out {len(docs)} documents, "
          f"{sum(n_tok.values())} tokens (fit {len(splits['fit'])} documents)")  # fmt: skip
    print(f"the run's split: calibration {len(cal)} docs ({sum(n_tok[d] for d in cal)} tokens), validation "
          f"{len(val)} docs: L0 {l0(cal, cut):.1f} / {l0(val, cut):.1f}; stored threshold gives "
          f"{l0(val, float(sae.threshold)):.1f} on validation")  # fmt: skip

    docs_x = [torch.from_numpy(x) for x in by_doc.values()]
    print(f"the stage's cross-fitted L0 (diffsae.train.crossfit_l0, seed {cfg.sae.seed}): "
          f"{crossfit_l0(sae, docs_x, k, cfg.sae.seed):.1f}")  # fmt: skip
    rng = np.random.default_rng(args.seed)
    cv = [crossfit_l0(sae, docs_x, k, args.seed + i) / k for i in range(args.repeats)]  # other random halvings
    r = np.array(cv)
    lo, mid, hi = np.percentile(r, [5, 50, 95])
    print(f"2-fold cross-fitted over random halves: L0/k median {mid:.3f} (5-95 % {lo:.3f}-{hi:.3f}), within 10 % in "
          f"{np.mean(np.abs(r - 1) <= 0.1):.0%}")
    by_norm = np.array(sorted(docs, key=lambda d: norm[d]))
    for stratified in (False, True):
        for share in args.cal_share:
            n_cal = min(len(docs) - 1, max(1, round(share * len(docs))))
            ratios = []
            for _ in range(args.repeats):
                if stratified:
                    is_cal = stratified_flags(len(docs), n_cal, rng)
                    c, v = by_norm[is_cal], by_norm[~is_cal]
                else:
                    perm = rng.permutation(docs)
                    c, v = perm[:n_cal], perm[n_cal:]
                ratios.append(l0(v, calibrated(c)) / k)
            r = np.array(ratios)
            lo, mid, hi = np.percentile(r, [5, 50, 95])
            print(f"{'stratified' if stratified else 'random    '} calibrate on {n_cal:3d} docs, measure on "
                  f"{len(docs) - n_cal:3d}: L0/k median {mid:.3f} (5-95 % {lo:.3f}-{hi:.3f}), within 10 % of k "
                  f"in {np.mean(np.abs(r - 1) <= 0.1):.0%} of {args.repeats} splits")  # fmt: skip


if __name__ == "__main__":
    main()
