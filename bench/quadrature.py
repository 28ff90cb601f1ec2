"""Quadrature points and token selection on a finished run's real pair: completeness, time and agreement.

What: on `--docs` documents of a finished run (its pair, its SAE, its activations on the store), each attribution
setting (`--settings`, e.g. `midpoint:16 gauss_legendre:4 gauss_legendre:4:select`) attributes the same documents
in batches of `--batch-tokens` tokens, with extraction's KL reused (the base model stops at the layer), and prints:
seconds per token; per-document completeness |Σ attr − drop| / |drop| (median, max, share of documents above 1 %);
and, against the first setting (the reference), how the per-latent attribution totals agree (Spearman over latents
firing in these documents, and the overlap of the top 50 latents by total).

Why: the attribution stage's defaults (`attribution.rule`, `steps`, `tokens`) are chosen on real organisms, not on
a random pair (bench/attribution.py measures cost at given dimensions; this measures what the points buy).

    python bench/quadrature.py --config examples/smollm2.yaml --store /tmp/s2store --docs 0:24 \\
        --settings midpoint:32 midpoint:16 gauss_legendre:8 gauss_legendre:4 gauss_legendre:4:select
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffsae.attribution import Selection, attribute_batch, doc_seed
from diffsae.config import AttributionConfig, PipelineConfig
from diffsae.extract import pad_batch, plan_batches
from storage import activations as act
from storage.context import RunContext
from tasks.attribute import load_sae
from tasks.models import MODEL_CACHE
from tasks.pair import demo_key, demo_pair_done, resolved_inputs


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--docs", default="0:24", help="START:END of the run's documents (in doc_id order)")
    ap.add_argument("--settings", nargs="+", default=["midpoint:16", "gauss_legendre:8", "gauss_legendre:4"])
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {"store": args.store} if args.store else {}
    cfg = PipelineConfig.from_yaml(args.config, overrides)
    ctx = RunContext.from_config(cfg)
    demo = demo_pair_done(ctx, demo_key(cfg.demo)) if cfg.uses_demo_pair else None
    models, _ = resolved_inputs(cfg, demo)
    pair = MODEL_CACHE.pair(ctx, models)
    sae = load_sae(ctx, pair.device)
    start, end = (int(x) for x in args.docs.split(":"))
    docs = act.read_docs(ctx.store, ctx.paths)[start:end]
    kls = act.read_doc_kls(ctx.store, ctx.paths)
    defaults = AttributionConfig()
    n_tok = sum(len(d.token_ids) for d in docs)
    print(f"run {cfg.run}: {len(docs)} documents, {n_tok} tokens, layer {models.layer}, "
          f"{args.threads} threads; selection top {defaults.select_top} sample {defaults.select_sample}")  # fmt: skip

    ref_total: np.ndarray | None = None
    for setting in args.settings:
        rule, steps, *rest = setting.split(":")
        totals = np.zeros(sae.W_dec_FD.shape[0])
        errors, t0 = [], time.perf_counter()
        for idx in plan_batches([len(d.token_ids) for d in docs], args.batch_tokens):
            batch = [docs[i] for i in idx]
            ids_BT, mask_BT = pad_batch(batch, pair.tokenizer.pad_token_id or 0, pair.device)
            kl_BT = torch.zeros(ids_BT.shape)
            for b, d in enumerate(batch):
                kl_BT[b, : len(d.token_ids)] = torch.from_numpy(kls[d.doc_id])
            select = None
            if rest and rest[0] == "select":
                seeds = [doc_seed(defaults.select_seed, d.doc_id) for d in batch]
                select = Selection(defaults.select_top, defaults.select_sample, seeds)
            out = attribute_batch(pair.base, pair.finetuned, models.layer, ids_BT, mask_BT, sae,
                                  int(steps), cfg.extract.skip_first, rule=rule, select=select,  # type: ignore[arg-type]
                                  kl_BT=kl_BT)  # fmt: skip
            drop, got = out.kl_drop_B.astype(np.float64), out.attr_sum_B.astype(np.float64)
            errors += list(np.abs(got - drop) / np.maximum(np.abs(drop), 1e-6))
            np.add.at(totals, out.latent_id, out.attribution.astype(np.float64))
        sec = time.perf_counter() - t0
        err = np.array(errors)
        line = (f"{setting:26s} {sec / n_tok * 1e3:7.1f} ms/token  completeness median {np.median(err):.1e} "
                f"max {err.max():.1e} >1%: {np.mean(err > 0.01):4.0%}")  # fmt: skip
        if ref_total is None:
            ref_total = totals
        else:
            firing = (ref_total != 0) | (totals != 0)
            top_ref = set(np.argsort(-ref_total)[:50])
            top_now = set(np.argsort(-totals)[:50])
            line += (f"  vs {args.settings[0]}: spearman {spearman(ref_total[firing], totals[firing]):.3f}, "
                     f"top-50 overlap {len(top_ref & top_now)}/50")  # fmt: skip
        print(line, flush=True)


if __name__ == "__main__":
    main()
