"""The organism benchmark (issue 15 part 5, partial): recovery v2, baselines and false alarms over a grid of
built-in pairs — seeds x mixes (audit: three planted behaviours and a broad drift; null: the same recipe without
the behaviours; kinds / kinds_null: the other family of behaviour kinds and its null organism) x SAE widths x k —
with the product defaults otherwise.

What: runs the whole pipeline (`flows.pipeline`) per grid point into one store, saves each run's `recovery` and
`false_alarms` rows and SAE metrics as JSON under `<store>/suite/` (an interrupted suite resumes), then prints per
order (every score, groups, the frequency / firing-KL baselines, random):
  - on the audit runs: behaviours recovered under v2 (held-out documents, precision and coverage), the median best
    rank (missing = never captured, counted as infinite);
  - on the null runs: false alarms = trigger labels (behaviours the null finetune does not have) that some top-10
    entry captures under v2, summed over runs; and on every run the placebo false alarms (mean over draws).
Seeds used to choose a default are the selection set; report the others as the test set (docs/EVALUATION.md says
which is which).

    python bench/suite.py --store /tmp/suite --seeds 3 4 --mixes audit null --widths 2048 --ks 32
    python bench/suite.py --store /tmp/suite --report

Built organisms (`diffsae build-organism`, and its `--null` for the null organism) join the grid with
`--organisms DIR ...` (their adapter and held-out prompts replace those of `--config`, a pipeline YAML naming the
base; mix = null when the organism's spec.yaml says `null: true`):

    python bench/suite.py --store /tmp/suite_s2 --seeds --mixes --organisms organisms/smollm2 /tmp/smollm2_null \
        --config examples/smollm2.yaml --widths 2048 4096 --ks 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# run as a script, bench/ comes first on sys.path and bench/dashboards.py would shadow the dashboards package
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from flows.server import owned_api_server  # noqa: E402
from organisms.demo_pair import NULL_MIXES  # noqa: E402
from storage import duck  # noqa: E402
from storage.context import RunContext  # noqa: E402


class Organism:
    """A built organism of the grid: its folder (adapter/, prompts.jsonl, spec.yaml) and the pipeline YAML whose
    models and data it replaces."""

    def __init__(self, folder: str, config: str) -> None:
        spec = yaml.safe_load((Path(folder) / "spec.yaml").read_text())
        self.folder, self.config, self.seed = Path(folder).resolve(), config, int(spec.get("seed", 0))
        self.name, self.mix = self.folder.name, "null" if spec.get("null") else "audit"

    def raw(self) -> dict[str, Any]:
        raw = yaml.safe_load(Path(self.config).read_text())  # a fresh dict per run
        raw["models"]["finetuned"] = str(self.folder / "adapter")
        raw["data"]["path"] = str(self.folder / "prompts.jsonl")
        return raw


def run_one(
    store: str, seed: int, mix: str, width: int, k: int, methods: list[str], organism: Organism | None = None
) -> dict[str, Any]:
    from diffsae.config import PipelineConfig
    from flows.pipeline import pipeline

    name = f"{mix}-s{seed}-F{width}-k{k}" if organism is None else f"{organism.name}-F{width}-k{k}"
    raw = {"demo": {"seed": seed, "mix": mix}} if organism is None else organism.raw()
    cfg = PipelineConfig.from_dict(raw | {
        "run": name, "store": store, "sae": {**raw.get("sae", {}), "n_latents": width, "k": k},
        "validation": {"top": 0}, "dashboards": {"top_latents": 10}, "methods": methods,
    })  # fmt: skip
    t0 = time.perf_counter()
    out = pipeline(config=cfg)
    per_method = {}
    for method, res in out.methods.items():
        con = RunContext.create(store, name).for_method(method).duck()
        alarms = "false_alarms" if "false_alarms" in duck.view_names(con) else None  # none: no narrow entry (ADL)
        per_method[method] = {
            "seconds": res.seconds, "recovery": res.analysis.ranking.recovery,
            "sae": {m: float(getattr(res.sae, m)) for m in ("fvu", "l0", "dead_fraction", "kl_gap_recovered")},
            "false_alarms": con.execute(f"SELECT * FROM {alarms}").to_arrow_table().to_pylist() if alarms else [],
        }  # fmt: skip
    first = per_method[methods[0]]
    return {"name": name, "seed": seed, "mix": mix, "width": width, "k": k, "seconds": time.perf_counter() - t0,
            **first, "methods": per_method}  # fmt: skip


def orders(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for x in r["recovery"]:
            if x["score"] not in seen:
                seen.append(x["score"])
    return seen


def worst_null(null: list[dict[str, Any]], order: str) -> int:
    """The most trigger labels one null run's top 10 claims under `order` (0 without null runs)."""
    return max((sum(bool(x["recovered_v2"]) for x in r["recovery"] if x["score"] == order) for r in null), default=0)


def recovered(audit: list[dict[str, Any]], order: str) -> tuple[int, int, float | None]:
    """(behaviours recovered under v2, behaviours, median best rank, never captured counted as infinite; None
    without rows) of `order` over the audit runs."""
    rows = [x for r in audit for x in r["recovery"] if x["score"] == order]
    ranks = [x["best_rank_v2"] if x["best_rank_v2"] is not None else float("inf") for x in rows]
    return sum(bool(x["recovered_v2"]) for x in rows), len(rows), statistics.median(ranks) if ranks else None


def mean_placebo(results: list[dict[str, Any]], order: str) -> float | None:
    """Placebo false alarms of `order`, mean per (run, draw) row; None without rows."""
    placebo = [a["false_alarms"] for r in results for a in r["false_alarms"] if a["score"] == order]
    return statistics.mean(placebo) if placebo else None


def choose(results: list[dict[str, Any]]) -> str:
    """The pre-registered selection rule (docs/EVALUATION.md, 2026-12-02): among the orders with at most 1 claimed
    label on every null run and at most 1 placebo false alarm per run on average, the most behaviours recovered
    (v2), then the lower median best rank, then `mean` (the standing default), then the name."""
    audit = [r for r in results if r["mix"] not in NULL_MIXES]
    null = [r for r in results if r["mix"] in NULL_MIXES]
    best: list[tuple[Any, ...]] = []
    for order in orders(results):
        if order in ("random", "frequency", "firing_kl"):  # baselines are yardsticks, not candidates
            continue
        placebo = mean_placebo(results, order)
        if worst_null(null, order) > 1 or (placebo is not None and placebo > 1):
            continue
        got, _, median = recovered(audit, order)
        best.append((-got, median if median is not None else float("inf"), order != "mean", order))
    return min(best)[-1] if best else "-"


def report(results: list[dict[str, Any]]) -> str:
    audit = [r for r in results if r["mix"] not in NULL_MIXES]
    null = [r for r in results if r["mix"] in NULL_MIXES]
    lines = [
        f"audit runs: {', '.join(r['name'] for r in audit) or '-'}; "
        f"null runs: {', '.join(r['name'] for r in null) or '-'}",
        "",
        "| order | behaviours recovered (v2) | median best rank (v2) | null: labels claimed in top 10 "
        "(most on one null run) | placebo false alarms (mean per run) |",
        "|---|---|---|---|---|",
    ]
    for order in orders(results):
        if order == "random":
            rows = [x for r in audit for x in r["recovery"] if x["score"] == order]
            got = f"{sum(x['expected_v2'] or 0 for x in rows):.2f} expected / {len(rows)}"
            median = "-"
        else:
            n_got, n_rows, med = recovered(audit, order)
            got, median = f"{n_got} / {n_rows}", "-" if med is None else f"{med:g}"
        claimed = [x for r in null for x in r["recovery"] if x["score"] == order]
        fa_null = (f"{sum(x['expected_v2'] or 0 for x in claimed):.2f} expected" if order == "random"
                   else f"{sum(bool(x['recovered_v2']) for x in claimed)} ({worst_null(null, order)})")  # fmt: skip
        placebo = mean_placebo(results, order)
        fa = "-" if placebo is None else f"{placebo:.2f}"
        lines.append(f"| {order} | {got} | {median} | {fa_null} | {fa} |")
    chosen = choose(results)
    lines += ["", f"chosen by the pre-registered rule: {chosen}", ""]
    for order in dict.fromkeys(["mean", chosen, "groups"]):
        per_run = []
        for r in audit:
            rows = sorted((x for x in r["recovery"] if x["score"] == order), key=lambda x: x["behaviour"])
            ranks = "/".join(str(x["best_rank_v2"]) if x["recovered_v2"] else f"({x['best_rank_v2']})" for x in rows)
            per_run.append(f"{r['name']} {ranks}")
        head = f"best ranks, {order} (behaviours alphabetical; in brackets: not recovered): "
        lines.append(head + "; ".join(per_run))
    lines += ["", "| run | FVU / L0 / dead / KL gap rec. | seconds |", "|---|---|---|"]
    for r in results:
        s = r["sae"]
        lines.append(f"| {r['name']} | {s['fvu']:.3f} / {s['l0']:.1f} / {100 * s['dead_fraction']:.1f} % / "
                     f"{s['kl_gap_recovered']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[3, 4])
    ap.add_argument("--mixes", nargs="*", default=["audit", "null"], choices=["audit", "null", "kinds", "kinds_null"])
    ap.add_argument("--organisms", nargs="*", default=[], help="built organism folders (diffsae build-organism)")
    ap.add_argument("--config", default="examples/smollm2.yaml", help="pipeline YAML the organisms run with")
    ap.add_argument("--widths", type=int, nargs="+", default=[2048])
    ap.add_argument("--ks", type=int, nargs="+", default=[32])
    ap.add_argument("--methods", nargs="+", default=["diff_sae"], choices=["diff_sae", "crosscoder", "adl"])
    ap.add_argument("--report", action="store_true", help="only print the tables of the saved results")
    args = ap.parse_args()
    out_dir = Path(args.store) / ("suite" if args.methods == ["diff_sae"] else "suite-" + "+".join(args.methods))
    out_dir.mkdir(parents=True, exist_ok=True)
    grid: list[tuple[int, str, int, int, Organism | None]] = [
        (s, m, w, k, None) for s in args.seeds for m in args.mixes for w in args.widths for k in args.ks
    ]
    organisms = [Organism(folder, args.config) for folder in args.organisms]
    grid += [(o.seed, o.mix, w, k, o) for w in args.widths for k in args.ks for o in organisms]  # side by side
    if not args.report:
        with owned_api_server():  # Prefect's temporary server dies with this process, however it ends
            run_grid(args.store, out_dir, grid, args.methods)
    results = sorted((json.loads(p.read_text()) for p in out_dir.glob("*.json")), key=lambda r: r["name"])
    print(report(results))
    if args.methods != ["diff_sae"]:
        print("\n" + method_table(results, args.methods))


def method_table(results: list[dict[str, Any]], methods: list[str]) -> str:
    """Per method, over the runs: KL gap recovered (mean, validation documents), behaviours recovered v2 by its
    default list (groups) on the audit runs, labels claimed on the null runs (most on one), placebo false alarms,
    wall time of its stages per run (mean)."""
    lines = ["| method | KL gap recovered (mean, min-max) | behaviours recovered v2 (groups) | median best rank | "
             "null: labels claimed (most on one run) | placebo false alarms | seconds per run |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in methods:
        runs = [{**r, **r["methods"][m]} for r in results if m in r.get("methods", {})]
        gaps = [r["sae"]["kl_gap_recovered"] for r in runs]
        audit = [r for r in runs if r["mix"] not in NULL_MIXES]
        null = [r for r in runs if r["mix"] in NULL_MIXES]
        got, n, med = recovered(audit, "groups")
        claimed = sum(bool(x["recovered_v2"]) for r in null for x in r["recovery"] if x["score"] == "groups")
        placebo = mean_placebo(runs, "groups")
        lines.append(
            f"| {m} | {statistics.mean(gaps):.3f} ({min(gaps):.3f}-{max(gaps):.3f}) | {got} / {n} | "
            f"{'-' if med is None else f'{med:g}'} | {claimed} ({worst_null(null, 'groups')}) | "
            f"{'-' if placebo is None else f'{placebo:.2f}'} | {statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def run_grid(
    store: str, out_dir: Path, grid: list[tuple[int, str, int, int, Organism | None]], methods: list[str]
) -> None:
    for seed, mix, width, k, organism in grid:
        stem = f"{mix}-s{seed}" if organism is None else organism.name
        path = out_dir / f"{stem}-F{width}-k{k}.json"
        if path.exists():
            continue
        res = run_one(store, seed, mix, width, k, methods, organism)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, path)
        print(f"== {path.name}: {res['sae']} ({res['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
