"""The methods comparison stage (issue 17): after every method of the run has run, one `methods` table (schema in
storage/schemas.py) and a page linking the methods' dashboards (`methods/index.html`, dashboards/methods.py).

Keyed on the methods' dictionary and ranking keys: adding a method reruns this small stage and that method's own
stages, nothing else. `methods/compare.json`, written last, is its marker."""

from __future__ import annotations

from typing import Any, NamedTuple

from prefect import task

from dashboards.methods import methods_page
from storage import schemas
from storage.context import RunContext
from storage.paths import DEFAULT_METHOD, join
from tasks.common import IO_RETRY, STAGE_CACHE, read_marker, stage_key, write_marker
from tasks.rank import RankingResult
from tasks.train import SAEResult


class CompareResult(NamedTuple):
    key: str
    methods: list[str]
    rows: list[dict[str, Any]]  # rows of the `methods` table
    index: str  # URL of the comparison page


def compare_key(results: dict[str, tuple[SAEResult, RankingResult]]) -> str:
    return stage_key("compare", compare, {m: (s.key, r.key) for m, (s, r) in results.items()})


def marker_url(ctx: RunContext) -> str:
    return join(ctx.paths.methods_root, "compare.json")


def compare_done(ctx: RunContext, key: str) -> CompareResult | None:
    return read_marker(ctx.store, marker_url(ctx), key, CompareResult)


def recovered_v2(ranking: RankingResult) -> tuple[int | None, int | None]:
    """(behaviours the default list recovers under v2, labelled behaviours); (None, None) without labels."""
    rows = [r for r in ranking.recovery if r.get("score") == "groups"] or [
        r for r in ranking.recovery if r.get("score") == ranking.rank_by
    ]
    if not rows:
        return None, None
    return sum(bool(r.get("recovered_v2")) for r in rows), len(rows)


def compare(ctx: RunContext, results: dict[str, tuple[SAEResult, RankingResult]], key: str) -> CompareResult:
    done = compare_done(ctx, key)
    if done is not None:
        return done
    rows = []
    for method, (sae, ranking) in results.items():
        cfg = ctx.store.read_json(ctx.for_method(method).paths.url("sae", "cfg.json"))
        got, n = recovered_v2(ranking)
        rows.append({
            "method": method, "architecture": cfg.get("architecture"), "n_latents": int(cfg["n_latents"]),
            "k": int(cfg["k"]), "kl_gap_recovered": sae.kl_gap_recovered, "fvu": sae.fvu, "l0": sae.l0,
            "dead_fraction": sae.dead_fraction, "n_ranked": ranking.n_latents, "recovered_v2": got,
            "n_behaviours": n, "sae_key": sae.key, "ranking_key": ranking.key,
        })  # fmt: skip
    table = schemas.from_rows([tuple(r[c] for c in schemas.METHODS.names) for r in rows], schemas.METHODS)
    ctx.store.write_parquet(ctx.paths.table("methods"), table)
    root = ctx.paths.methods_root
    links = {m: "../dashboards/index.html" if m == DEFAULT_METHOD else f"{m}/dashboards/index.html" for m in results}
    index = join(root, "index.html")
    ctx.store.write_bytes(index, methods_page(ctx.run, rows, links).encode(), "text/html")
    out = CompareResult(key, list(results), rows, index)
    write_marker(ctx.store, marker_url(ctx), out)
    return out


@task(name="compare-methods", cache_policy=STAGE_CACHE, **IO_RETRY)
def compare_task(ctx: RunContext, results: dict[str, tuple[SAEResult, RankingResult]], key: str) -> CompareResult:
    return compare(ctx, results, key)
