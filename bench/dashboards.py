"""Bench: render time of the static KL dashboards for 1,000 latent pages from synthetic tables.

Why: `render_site` must stay cheap next to the GPU stages (target: <= 60 s for 1,000 latent pages on 2 cores).
How: builds synthetic tables (dashboards/synthetic.py; default 4,096 latents, 2,000 docs x 128 tokens, about
1M latent_tokens rows), then renders the full site (index, 1,000 latent pages, token explorer) through a no-op
writer (rendering alone) and with `render_to_dir` into a temporary folder (rendering + disk writes).

    .venv/bin/python bench/dashboards.py                 # defaults
    .venv/bin/python bench/dashboards.py --pages 200 --docs 500 --keep out/site
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the package it measures: drop its folder from sys.path to import the package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from dashboards import render_site, render_to_dir  # noqa: E402
from diffsae.config import DashboardsConfig  # noqa: E402
from tests.synthetic import synthetic_summary, synthetic_tables  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1000, help="latent pages (DashboardsConfig.top_latents)")
    ap.add_argument("--latents", type=int, default=4096, help="dictionary size of the synthetic run")
    ap.add_argument("--docs", type=int, default=2000, help="synthetic documents")
    ap.add_argument("--doc-len", type=int, default=128, help="tokens per document")
    ap.add_argument("--contexts", type=int, default=10, help="contexts per latent and kind (n_contexts)")
    ap.add_argument("--keep", default=None, help="render into this folder and keep it")
    args = ap.parse_args()

    t0 = time.perf_counter()
    tables = synthetic_tables(n_latents=args.latents, n_docs=args.docs, doc_len=args.doc_len, seed=0)
    t_tables = time.perf_counter() - t0
    cfg = DashboardsConfig(top_latents=args.pages, n_contexts=args.contexts, n_high_kl_tokens=100)
    summary = synthetic_summary(tables, run="bench")
    print(
        f"tables: {tables.latents.height} latents, {tables.docs.height} docs, {tables.tokens.height} tokens, "
        f"{tables.latent_tokens.height} latent_tokens rows ({t_tables:.2f} s)"
    )

    t0, c0 = time.perf_counter(), time.process_time()
    res = render_site(tables, summary, lambda path, data, ctype: None, cfg)
    t_mem, c_mem = time.perf_counter() - t0, time.process_time() - c0
    n_latent = len(res.latent_ids)
    print(
        f"render (no-op writer): {t_mem:.2f} s wall ({c_mem:.2f} s CPU), {n_latent} latent pages, "
        f"{n_latent / t_mem:.0f} pages/s, {res.n_bytes / 1e6:.1f} MB"
    )

    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "dashboards")
        t0, c0 = time.perf_counter(), time.process_time()
        res = render_to_dir(tables, summary, cfg, out)
        t_dir, c_dir = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"render_to_dir: {t_dir:.2f} s wall ({c_dir:.2f} s CPU), {n_latent} latent pages "
        f"({res.n_pages} pages in all), {n_latent / t_dir:.0f} pages/s, {len(res.files)} files, "
        f"{res.n_bytes / 1e6:.1f} MB, "
        f"cpus={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
