"""The whole method on one page: diff-SAE on h_ft − h_base, KL attribution by integrated gradients, a ranking.

    python examples/minimal.py --layer 1 --latents 128 --k 4 --steps 300

1. a tiny random Llama pair (finetuned = base with perturbed blocks 1-2) and prompts, from tests/tiny.py;
2. paired forward passes: diff = h_ft − h_base at the output of block L, and KL(p_ft ‖ p_base) per token;
3. a BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv:2412.06410) with the AuxK dead-latent loss (Gao et al.
   2024, arXiv:2406.04093) reconstructs diff; validation FVU, L0 and the share of the KL gap it recovers;
4. integrated gradients (Sundararajan, Taly & Yan 2017, arXiv:1703.01365) attribute to every active latent its
   share of KL(0) − KL(1) along h_base + b + α·Σ a_i d_i; completeness: the shares sum to the drop, per doc;
5. latents ranked by mean attribution per firing token, with the document label holding most of their mass.
Core modules only (diffsae/*): no Prefect, store, MLflow or DuckDB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.utils.logging import disable_progress_bar

from diffsae.attribution import attribute_batch, latent_doc_stats
from diffsae.config import ModelsConfig, SAEConfig
from diffsae.data import load_docs
from diffsae.extract import extract_docs, pad_batch, plan_batches
from diffsae.models import load_pair
from diffsae.train import calibrate_threshold, evaluate, train_sae


class Results(NamedTuple):
    fvu: float
    l0: float
    dead_fraction: float
    kl_gap_recovered: float  # 1 − Σ KL(ft ‖ patch(h_base + x̂)) / Σ KL(ft ‖ patch(h_base)), validation tokens
    completeness_max_rel_error: float  # max over docs of |Σ attr − (KL(0) − KL(1))| / |KL(0) − KL(1)|
    top: list[tuple[int, float, int, str]]  # (latent, score, firing tokens, dominant label), best first


def tiny_pair(root: Path, n_prompts: int, seed: int) -> tuple[str, str, str]:
    """Build the tiny test pair of tests/tiny.py under `root`: (base folder, finetuned folder, prompts.jsonl)."""
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)  # `tests` is not an installed package: import it from the checkout
    from tests.tiny import make_pair, make_prompts

    base, ft = make_pair(root, seed=seed)
    return base, ft, make_prompts(root / "prompts.jsonl", n=n_prompts, seed=seed)


def main(argv: list[str] | None = None) -> Results:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=1, help="residual after block L (tiny pair: 1 or 2, block 0 is equal)")
    p.add_argument("--latents", type=int, default=128, help="SAE dictionary size F")
    p.add_argument("--k", type=int, default=4, help="BatchTopK: mean active latents per token")
    p.add_argument("--steps", type=int, default=300, help="SAE training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=120, help="documents in the tiny prompt set")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    disable_progress_bar()  # transformers' save/load bars
    t0, dev = time.perf_counter(), torch.device("cpu")

    # 1. the model pair (checked: same tokenizer, width, layer count) and the prompts, tokenized with roles ------
    with tempfile.TemporaryDirectory(prefix="diffsae-minimal-") as tmp:
        base_path, ft_path, prompts = tiny_pair(Path(tmp), args.prompts, args.seed)
        pair = load_pair(ModelsConfig(base=base_path, finetuned=ft_path, layer=args.layer, device="cpu"), True)
        docs = load_docs(prompts, pair.tokenizer, max_tokens_per_doc=64)
    pad_id = pair.tokenizer.pad_token_id

    # 2. extract: diff = h_ft − h_base at layer L and KL(p_ft ‖ p_base), per real token -------------------------
    diff, kl, doc = [], [], []
    for b in extract_docs(pair.base, pair.finetuned, args.layer, docs, 2048, dev, store_dtype="float32", pad_id=pad_id):
        diff.append(b.diff_ND[b.in_sae_N])  # BOS (attention sink) rows stay out of the SAE's data
        kl.append(b.kl_N[b.in_sae_N])
        doc.append(b.doc_id_N[b.in_sae_N])
    diff_ND, kl_N, doc_N = np.concatenate(diff), np.concatenate(kl), np.concatenate(doc)
    if not diff_ND.any():
        sys.exit(f"diff is 0 at layer {args.layer}: the two models agree there (tiny pair: use --layer 1 or 2)")
    is_val_doc = np.random.default_rng(args.seed).random(len(docs)) < 0.2  # train/validation split by document
    train_ND, val_ND = diff_ND[~is_val_doc[doc_N]], diff_ND[is_val_doc[doc_N]]
    print(f"docs {len(docs)}, tokens {len(diff_ND)} (train {len(train_ND)}, val {len(val_ND)}), d_model "
          f"{diff_ND.shape[1]}, layer {args.layer}, mean KL(ft‖base) {kl_N.mean():.4f} nats/token")

    # 3. train the BatchTopK diff-SAE (loss = mse + α·AuxK), then calibrate its inference threshold (L0 = k) ---
    cfg = SAEConfig(n_latents=args.latents, k=args.k, batch_size=256, dead_tokens=4096, seed=args.seed, device="cpu")
    rng = np.random.default_rng(args.seed)
    batches = (torch.from_numpy(train_ND[rng.integers(0, len(train_ND), cfg.batch_size)]) for _ in range(args.steps))

    def log(step: int, m: dict[str, float]) -> None:
        print(f"step {step:4d}: loss {m['loss']:.4f}, fvu {m['fvu']:.3f}, l0 {m['l0']:.2f}, auxk {m['auxk_loss']:.3f}")

    sae = train_sae(cfg, batches, diff_ND.shape[1], torch.from_numpy(train_ND), args.steps, device=dev, on_step=log,
                    progress=False, log_every=max(1, args.steps // 3)).sae.eval()
    calibrate_threshold(sae, [torch.from_numpy(train_ND)], cfg.k)  # on training tokens; L0 is reported on val
    val = evaluate(sae, [torch.from_numpy(val_ND)])

    # 4. attribute KL to latents by integrated gradients, batch by batch of whole documents ---------------------
    rec: dict[str, list[Any]] = {k: [] for k in ("doc", "latent", "attr")}
    drop_B, attr_sum_B, kl_recon, kl_base = [], [], 0.0, 0.0
    for idx in plan_batches([len(d.token_ids) for d in docs], 1024):
        ids_BT, mask_BT = pad_batch([docs[i] for i in idx], pad_id, dev)
        out = attribute_batch(pair.base, pair.finetuned, args.layer, ids_BT, mask_BT, sae, steps=16)
        doc_ids_B = np.asarray(idx, np.int64)
        rec["doc"].append(doc_ids_B[out.batch_idx])
        rec["latent"].append(out.latent_id)
        rec["attr"].append(out.attribution)
        drop_B.append(out.kl_drop_B)
        attr_sum_B.append(out.attr_sum_B)
        val_B = is_val_doc[doc_ids_B]  # KL gap recovered: validation documents only, as the pipeline reports it
        kl_recon += float(np.nansum(out.kl_patch_recon_BT[val_B]))
        kl_base += float(np.nansum(out.kl_patch_base_BT[val_B]))
    drop, got = np.concatenate(drop_B).astype(np.float64), np.concatenate(attr_sum_B).astype(np.float64)
    rel_err = np.abs(got - drop) / np.maximum(np.abs(drop), 1e-6)
    doc_P, lat_P, attr_P = (np.concatenate(rec[k]) for k in ("doc", "latent", "attr"))

    # 5. rank: mean attribution per firing token (≥ 5 tokens); dominant label = largest positive attribution mass
    n_F = np.bincount(lat_P, minlength=sae.n_latents)
    attr_F = np.bincount(lat_P, weights=attr_P, minlength=sae.n_latents)
    score_F = np.where(n_F >= 5, attr_F / np.maximum(n_F, 1), -np.inf)
    stats = latent_doc_stats(doc_P, lat_P, np.ones_like(attr_P), attr_P)  # per (latent, doc): S_d = attr_sum
    labels = sorted({d.behaviour for d in docs})
    label_G = np.array([labels.index(docs[d].behaviour) for d in stats.doc_id], dtype=np.int64)
    mass_FL = np.zeros((sae.n_latents, len(labels)))
    np.add.at(mass_FL, (stats.latent_id, label_G), np.maximum(stats.attr_sum, 0.0))
    top = []
    for f in [int(f) for f in np.argsort(-score_F, kind="stable")[:10] if np.isfinite(score_F[f])]:
        dom = labels[int(mass_FL[f].argmax())] if mass_FL[f].sum() > 0 else "-"
        share = mass_FL[f].max() / mass_FL[f].sum() if mass_FL[f].sum() > 0 else 0.0
        top.append((f, float(score_F[f]), int(n_F[f]), f"{dom} ({share:.0%})"))

    res = Results(val.fvu, val.l0, val.dead_fraction, 1.0 - kl_recon / kl_base if kl_base > 0 else float("nan"),
                  float(rel_err.max()), top)
    print(f"\nvalidation: FVU {res.fvu:.3f}, L0 {res.l0:.2f} (k={args.k}), dead {res.dead_fraction:.1%}, "
          f"KL gap recovered {res.kl_gap_recovered:.1%}")
    print(f"completeness: Σ attr vs KL(0)−KL(1) over {len(drop)} docs, Σ drop {drop.sum():.4f} / Σ attr "
          f"{got.sum():.4f}, max relative error {res.completeness_max_rel_error:.2e}")
    print(f"\ntop latents by mean attribution per firing token (labels: {', '.join(labels)}):")
    print(" rank latent  score(nats)  tokens  dominant label (share of positive mass)")
    for r, (f, s, n, dom) in enumerate(top, 1):
        print(f" {r:4d} {f:6d}  {s:11.2e}  {n:6d}  {dom}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return res


if __name__ == "__main__":
    main()
