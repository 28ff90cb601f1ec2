"""How latent groups are linked, compared on finished runs: the default list (groups) under each link rule, judged
by recovery v2 on the SAE's held-out documents and, on null runs, by the trigger labels its top 10 claims.

What: for every run named (all runs of `--store` by default), the rank stage's `latents` table is regrouped under
each variant `BY:J` (BY = documents: the Jaccard of the latents' document sets; attribution: the weighted Jaccard
of their attribution over documents; J = the link threshold) with storage/groups.py, and recovery v2 is recomputed
with storage/recovery.py as the rank stage does, with its default roles and `group_top` (the settings of the suite's
runs; a run's own rank settings are not stored). Nothing is retrained; a run's tables are not rewritten.
A run whose name starts with `null` counts claimed labels (any top-10 group capturing a label the null finetune
does not have); every other run counts behaviours recovered.

    python bench/groups.py --store /tmp/suite_sel --variants documents:0.5 attribution:0.5
    python bench/groups.py --store /tmp/altstore --runs pair_e1 pair_e2 --variants documents:0.5 attribution:0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from diffsae.config_analysis import RankConfig  # noqa: E402
from storage.context import RunContext  # noqa: E402
from storage.groups import latent_groups  # noqa: E402
from storage.recovery import recovery  # noqa: E402
from tasks.rank import rank_params, sae_heldout  # noqa: E402


def regroup(store: str, run: str, variants: list[tuple[str, float]]) -> dict[tuple[str, float], dict[str, int | None]]:
    """Per variant: behaviour -> the best group rank capturing it under v2 (None: no group captures it)."""
    ctx = RunContext.create(store, run)
    con = ctx.duck()
    latents = ctx.store.read_parquet(ctx.paths.table("latents"))
    cfg = RankConfig()
    roles = rank_params(cfg).roles
    heldout = sae_heldout(ctx, con)
    out = {}
    for by, jac in variants:
        groups = latent_groups(con, latents, roles=roles, top=cfg.group_top, min_jaccard=jac, by=by)
        rec = recovery(con, latents, roles=roles, heldout=heldout, groups=groups).to_pylist()
        out[(by, jac)] = {r["behaviour"]: r["best_rank_v2"] for r in rec if r["score"] == "groups"}
    return out


def runs_of(store: str) -> list[str]:
    return sorted(p.name for p in (Path(store) / "runs").iterdir() if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a local store holding finished runs")
    ap.add_argument("--runs", nargs="*", help="run names (default: every run of the store)")
    ap.add_argument("--variants", nargs="+", default=["documents:0.5", "attribution:0.5"], help="BY:J link rules")
    ap.add_argument("--top-k", type=int, default=10, help="a behaviour is recovered when its best rank is <= this")
    args = ap.parse_args(argv)
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants]
    names = args.runs or runs_of(args.store)
    table: dict[tuple[str, float], list[tuple[str, dict[str, int | None]]]] = {v: [] for v in variants}
    for run in names:
        got = regroup(args.store, run, variants)
        cells = "  ".join(f"{by}:{jac:g} " + " ".join(f"{b}={r}" for b, r in sorted(got[(by, jac)].items()))
                          for by, jac in variants)  # fmt: skip
        print(f"{run:28s} {cells}", flush=True)
        for v in variants:
            table[v].append((run, got[v]))
    print("\nvariant            recovered  median best rank  null: labels claimed (most on one run)")
    for (by, jac), rows in table.items():
        audit = [r for name, got in rows if not name.startswith("null") for r in got.values()]
        claims = [sum(r is not None and r <= args.top_k for r in got.values())
                  for name, got in rows if name.startswith("null")]  # fmt: skip
        hit = sum(r is not None and r <= args.top_k for r in audit)
        med = statistics.median([r if r is not None else float("inf") for r in audit]) if audit else float("nan")
        print(f"{by + ':' + format(jac, 'g'):18s} {hit:>3d} of {len(audit):<4d} {med:>10}        "
              f"{sum(claims)} ({max(claims, default=0)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
