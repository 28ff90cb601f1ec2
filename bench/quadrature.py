"""Quadrature points and token selection on a finished run's real pair: completeness, time and agreement.

What: on `--docs` documents of a finished run (its pair, its SAE, its activations on the store), each attribution
setting (`--settings`, e.g. `midpoint:16 gauss_legendre:4 gauss_legendre:4:select gauss_legendre:4:bfloat16`: rule,
points, then `select` and/or `bfloat16` gradient passes and/or `states`: extraction's stored states read, as the
stage does when the run has them, instead of both models' unpatched forward) attributes the same documents
in batches of `--batch-tokens` tokens as the stage does (`diffsae.documents.attribute_docs`: extraction's KL reused,
documents missing 1 % refined: the Kronrod extension, then twice the points), and prints: seconds per token and
the ratio to a paired forward of the same batches; documents refined; per-document completeness |Σ attr − drop| /
|drop| (median, max);
and, against the first setting (the reference), how the per-latent attribution totals agree (Spearman over latents
firing in these documents, and the overlap of the top 50 latents by total).

A setting prefixed `full:` (e.g. `full:midpoint:16`) runs the path before 2026-11-30 (bench/old_path.py: whole
model per patched pass, dense head gradient, extraction's KL not reused), so old and new are timed in one run.

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
from old_path import PATHS, use_path  # bench/old_path.py: the path before 2026-11-30

from diffsae.config import AttributionConfig, PipelineConfig
from diffsae.documents import attribute_docs
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
    ap.add_argument("--run", default=None, help="the run's name, if not the config's")
    ap.add_argument("--docs", default="0:24", help="START:END of the run's documents (in doc_id order)")
    ap.add_argument("--settings", nargs="+", default=["midpoint:16", "gauss_legendre:8", "gauss_legendre:4"])
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {key: v for key, v in (("store", args.store), ("run", args.run)) if v}
    cfg = PipelineConfig.from_yaml(args.config, overrides)
    ctx = RunContext.from_config(cfg)
    demo = demo_pair_done(ctx, demo_key(cfg.demo)) if cfg.uses_demo_pair else None
    models, _ = resolved_inputs(cfg, demo)
    pair = MODEL_CACHE.pair(ctx, models)
    sae = load_sae(ctx, pair.device)
    start, end = (int(x) for x in args.docs.split(":"))
    docs = act.read_docs(ctx.store, ctx.paths)[start:end]
    kls = act.read_doc_kls(ctx.store, ctx.paths)
    manifest = act.read_manifest(ctx.store, ctx.paths)
    states = None
    if any("states" in s.split(":") for s in args.settings):
        if manifest is None or not act.has_states(ctx.store, ctx.paths, manifest):
            raise SystemExit("error: a `states` setting needs a run extracted with extract.save_states")
        states = act.read_doc_states(ctx.store, ctx.paths, manifest, [d.doc_id for d in docs])
    defaults = AttributionConfig()
    n_tok = sum(len(d.token_ids) for d in docs)
    print(f"run {cfg.run}: {len(docs)} documents, {n_tok} tokens, layer {models.layer}, "
          f"{args.threads} threads; selection top {defaults.select_top} sample {defaults.select_sample}")  # fmt: skip

    batches = [[docs[i] for i in idx] for idx in plan_batches([len(d.token_ids) for d in docs], args.batch_tokens)]
    t0 = time.perf_counter()
    with torch.no_grad():  # the paired forward (what extraction costs): both models, logits included
        for batch in batches:
            ids_BT, mask_BT = pad_batch(batch, pair.tokenizer.pad_token_id or 0, pair.device)
            pair.base(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
            pair.finetuned(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    t_pair = time.perf_counter() - t0
    print(f"paired forward             {t_pair / n_tok * 1e3:7.1f} ms/token", flush=True)

    ref_total: np.ndarray | None = None
    for setting in args.settings:
        path, *fields = setting.split(":")
        if path not in PATHS:  # no path prefix: today's
            path, fields = "upper", [path, *fields]
        rule, steps, *rest = fields
        use_path(path)
        totals = np.zeros(sae.W_dec_FD.shape[0])
        errors, refined, t0 = [], 0, time.perf_counter()
        tokens = "select" if "select" in rest else "all"
        precision = "bfloat16" if "bfloat16" in rest else "float32"
        acfg = AttributionConfig(rule=rule, steps=int(steps), tokens=tokens, precision=precision)  # type: ignore[arg-type]
        reuse = kls if path == "upper" else None  # the old stage ran the base to the end for KL(0)
        stored = states if "states" in rest else None
        for batch in batches:  # as the stage does: documents missing 1 % are refined (diffsae.documents)
            for a in attribute_docs(pair, models.layer, sae, batch, acfg, cfg.extract.skip_first, acfg.steps, reuse,
                                    states=stored):  # fmt: skip
                errors.append(a.rel_error)
                refined += a.steps > acfg.steps
                np.add.at(totals, a.records["latent_id"], a.records["kl_attribution"].astype(np.float64))
        sec = time.perf_counter() - t0
        err = np.array(errors)
        line = (f"{setting:24s} {sec / n_tok * 1e3:6.1f} ms/token ({sec / t_pair:4.1f}x paired)  refined "
                f"{refined}/{len(docs)}, completeness median {np.median(err):.1e} max {err.max():.1e}")  # fmt: skip
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
