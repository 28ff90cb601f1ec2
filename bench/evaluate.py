"""Which latent score surfaces the planted behaviours? The evaluation behind `attribution.rank_by` (issue 9).

What: for each seed of the built-in planted pair (audit-like mix; the seed changes weights, data and the planted
triggers, topics, persona and secret word) and each SAE width, run the whole pipeline (`flows.pipeline`) into one
store and collect the diff-SAE's validation metrics and the recovery table (per score: each planted behaviour's
best rank among latents that capture it, and the top-10 capture fraction). Each finished run is saved as JSON
under `<store>/eval/`, so an interrupted sweep resumes (finished runs are skipped; stages are cached anyway).
Prints a Markdown table per run and a summary per score: in how many (seed, width) runs every planted behaviour
was recovered (best rank <= 10), and the worst best-rank.

Why: the default score must be chosen on evidence over several pairs and widths, not one demo run.

    python bench/evaluate.py --store /tmp/eval --seeds 0 1 2 --widths 2048 4096
    python bench/evaluate.py --store /tmp/eval --report        # tables from the saved results only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# run as a script, bench/ comes first on sys.path and bench/dashboards.py would shadow the dashboards package
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from storage.ranking import SCORES  # noqa: E402


def run_one(store: str, preset: str, seed: int, width: int) -> dict[str, Any]:
    from diffsae.config import PipelineConfig
    from flows.pipeline import pipeline

    cfg = PipelineConfig.from_dict({
        "run": f"{preset}-s{seed}-F{width}", "store": store,
        "demo": {"preset": preset, "seed": seed}, "sae": {"n_latents": width},
        "dashboards": {"top_latents": 10},
    })  # fmt: skip
    t0 = time.perf_counter()
    out = pipeline(config=cfg)
    sae = {k: float(getattr(out.sae, k)) for k in ("fvu", "l0", "dead_fraction", "kl_gap_recovered")}
    return {
        "preset": preset, "seed": seed, "width": width, "k": cfg.sae.k, "seconds": time.perf_counter() - t0,
        "sae": sae, "recovery": out.ranking.recovery, "planted": sorted(
            {r["behaviour"] for r in out.ranking.recovery}),
    }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (run, score): SAE metrics on the first row, best rank per behaviour slot."""
    lines = [
        "| pair seed | width | FVU / L0 / dead / KL gap rec. | score | behaviours (best rank; * = top 10) "
        "| top-10 capture |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["sae"]
        metrics = f"{s['fvu']:.3f} / {s['l0']:.1f} / {100 * s['dead_fraction']:.1f} % / {s['kl_gap_recovered']:.3f}"
        for i, score in enumerate(SCORES):
            rows = [x for x in r["recovery"] if x["score"] == score]
            cells = ", ".join(
                f"{x['behaviour']} {x['best_rank'] if x['best_rank'] is not None else '-'}"
                f"{' *' if x['recovered'] else ''}"
                for x in sorted(rows, key=lambda x: x["behaviour"])
            )
            frac = rows[0]["top10_capture_fraction"] if rows else 0.0
            head = [str(r["seed"]), str(r["width"]), metrics] if i == 0 else ["", "", ""]
            lines.append("| " + " | ".join(head + [score, cells, f"{frac:.1f}"]) + " |")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    """Per score: runs with every planted behaviour recovered, behaviours recovered, worst best-rank."""
    lines = [
        "| score | runs with all recovered | behaviours recovered | worst best rank | mean top-10 capture |",
        "|---|---|---|---|---|",
    ]
    for score in SCORES:
        all_ok, hits, total, worst, fracs = 0, 0, 0, 0, []
        for r in results:
            rows = [x for x in r["recovery"] if x["score"] == score]
            all_ok += all(x["recovered"] for x in rows)
            hits += sum(x["recovered"] for x in rows)
            total += len(rows)
            ranks = [x["best_rank"] if x["best_rank"] is not None else 10**9 for x in rows]
            worst = max([worst] + ranks)
            fracs.append(rows[0]["top10_capture_fraction"] if rows else 0.0)
        w = "none captures" if worst >= 10**9 else str(worst)
        mean_frac = sum(fracs) / max(len(fracs), 1)
        lines.append(f"| {score} | {all_ok} / {len(results)} | {hits} / {total} | {w} | {mean_frac:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="Store for the runs (pairs are built once per seed)")
    ap.add_argument("--preset", default="demo", choices=["demo", "small"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--report", action="store_true", help="only print the tables of the saved results")
    args = ap.parse_args()
    out_dir = Path(args.store) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed in [] if args.report else args.seeds:
        for width in args.widths:
            path = out_dir / f"{args.preset}-s{seed}-F{width}.json"
            if path.exists():
                continue
            res = run_one(args.store, args.preset, seed, width)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, path)
            print(f"== {path.name}: {res['sae']} ({res['seconds']:.0f} s)", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{args.preset}-s*-F*.json"))]
    results.sort(key=lambda r: (r["seed"], r["width"]))
    print(table(results))
    print()
    print(summary(results))


if __name__ == "__main__":
    main()
