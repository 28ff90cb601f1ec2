"""Does the ranking surface the planted behaviours? Recovery v1 and v2 with baselines, in DuckDB SQL.

v1 (storage/sql/recovery.sql, kept beside v2 for one release): a latent captures behaviour b when >= 80 % of its
positive attribution mass lies in b's documents, on every document; precision only.
v2 (storage/sql/recovery_v2.sql, issue 15): on documents held out of SAE training only (diffsae/split.py), a latent
captures b when it has that precision AND fires in >= 50 % of b's held-out documents (coverage). Every score is
judged, beside three baselines over the same narrow latents: the `frequency` order, the `firing_kl` order (mean
per-token KL where the latent fires) and a `random` order, whose expected recovery has a closed form
(random_recovery).

    rec = recovery(con, latents, roles=("assistant", "text"), heldout=heldout_docs(n_docs, sae_cfg))
    print(format_recovery(rec))
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa

from diffsae.config import SCORES
from storage import schemas
from storage.duck import view_names
from storage.ranking import (
    RankParams,
    behaviour_mass_sql,
    has_planted,
    latent_docs_sql,
    load_sql,
    rank_latents,
    registered,
    render,
    role_filter,
)

BASELINES = ("frequency", "firing_kl", "random")  # orders judged beside the scores (v2 only)
GROUPS = "groups"  # the order of latent groups (storage/groups.py; v2 only, when the groups are given)
_NO_GROUPS = "(SELECT NULL::INTEGER AS latent_id, NULL::BIGINT AS group_rank WHERE false)"
_NO_FIRING_KL = "(SELECT NULL::INTEGER AS latent_id, NULL::DOUBLE AS firing_kl WHERE false)"


def random_recovery(n: int, m: int, k: int) -> float:
    """Probability that a uniformly random order of `n` entries puts one of `m` capturing entries in its top `k`:
    1 - C(n - m, k) / C(n, k)."""
    if m <= 0 or n <= 0:
        return 0.0
    if k >= n or m > n - k:
        return 1.0
    miss = 1.0
    for i in range(k):
        miss *= (n - m - i) / (n - i)
    return 1.0 - miss


def _firing_kl_sql(views: list[str], roles_where: str | None) -> str:
    if "tokens" not in views:
        return _NO_FIRING_KL
    return (
        "(SELECT lt.latent_id, avg(t.kl) AS firing_kl FROM latent_tokens AS lt JOIN tokens AS t"
        f" ON t.doc_id = lt.doc_id AND t.pos = lt.pos WHERE {roles_where or 'true'} GROUP BY lt.latent_id)"
    )


def _scored_docs_sql(views: list[str], roles_where: str | None, groups: str | None) -> str:
    """(latent_id, doc_id, attr_sum) of the scored tokens for every latent and, with `groups`, for each group as
    one entry (id -group_rank, its members' attribution summed per document): what captures_v2.sql judges."""
    ld = latent_docs_sql(views, roles_where=roles_where)
    if groups is None:
        return ld
    return (
        f"(SELECT latent_id, doc_id, attr_sum FROM {ld} AS x UNION ALL SELECT -g.group_rank::INTEGER, x.doc_id,"
        f" sum(x.attr_sum) FROM {ld} AS x JOIN {groups} AS g ON g.latent_id = x.latent_id"
        " GROUP BY g.group_rank, x.doc_id)"
    )


def _captures_sql(scored_docs: str, docs: str, heldout: str) -> str:
    return render(load_sql("captures_v2.sql"), latent_docs=scored_docs, docs=docs, heldout=heldout)


def _orders_sql(views: list[str], roles_where: str | None, latents: str, groups: str | None) -> str:
    sql = load_sql("orders_v2.sql")
    return render(sql, latents=latents, firing_kl=_firing_kl_sql(views, roles_where), groups=groups or _NO_GROUPS)


def _narrow_columns(latents: pa.Table) -> pa.Table:
    """The latents columns the v1/v2 SQL reads: statistics it needs, `rank` and one rank_<score> per score."""
    return latents.select(["latent_id", "n_active", "pos_mass", "rank"] + [f"rank_{s}" for s in SCORES])


def _group_ranks(groups: pa.Table | None) -> pa.Table | None:
    return None if groups is None else groups.select(["latent_id", "group_rank"])


def recovery(
    con: duckdb.DuckDBPyConnection,
    latents: pa.Table | None = None,
    *,
    capture_share: float = 0.8,
    coverage: float = 0.5,
    top_k: int = 10,
    roles: tuple[str, ...] | None = None,
    heldout: Sequence[int] | np.ndarray | None = None,
    groups: pa.Table | None = None,
) -> pa.Table:
    """The `recovery` table (storage/schemas.py RECOVERY): per (order, planted behaviour) v1 (best_rank, recovered,
    top10_capture_fraction; scores only) and v2 (best_rank_v2, recovered_v2, expected_v2, n_capturing, n_heldout;
    scores and BASELINES). `latents`: a rank_latents table (default: the run's `latents` view, else ranked now);
    `roles`: the roles it was ranked with (capture is judged on their tokens); `heldout`: the doc ids the SAE never
    trained on (None: every document, said by n_heldout); `groups`: a latent_groups table (adds the `groups` order).
    Empty when the run has no planted behaviour."""
    views = view_names(con)
    if not has_planted(con):
        return schemas.RECOVERY.empty_table()
    latent_docs_sql(views)  # latent_tokens must exist
    if latents is None:
        if "latents" in views:
            latents = con.execute("SELECT * FROM latents").to_arrow_table()
        else:
            latents = rank_latents(con, params=RankParams(roles=roles))
    roles_where = role_filter(con, roles)
    rank_cols = [f"rank_{s}" for s in SCORES]
    held_ids = None if heldout is None else pa.table({"doc_id": pa.array(np.asarray(heldout, np.int64), pa.int64())})
    with registered(con, latents=_narrow_columns(latents), heldout=held_ids, groups=_group_ranks(groups)) as names:
        v1 = con.execute(
            render(
                load_sql("recovery.sql"),
                behaviour_mass=behaviour_mass_sql(views, roles_where),
                docs="docs",
                latents=f"(SELECT latent_id, pos_mass, {', '.join(rank_cols)} FROM {names['latents']})",
            ),
            {"capture_share": capture_share, "top_k": top_k, "scores": list(SCORES)},
        ).fetchall()
        held = names["heldout"] or "(SELECT doc_id FROM docs)"
        v2 = con.execute(
            render(
                load_sql("recovery_v2.sql"),
                captures=_captures_sql(_scored_docs_sql(views, roles_where, names["groups"]), "docs", held),
                orders=_orders_sql(views, roles_where, names["latents"], names["groups"]),
                docs="docs",
                heldout=held,
            ),
            {"precision": capture_share, "coverage": coverage, "top_k": top_k},
        ).fetchall()
        n_narrow = con.execute(f"SELECT count(*) FROM {names['latents']} WHERE rank IS NOT NULL").fetchone()[0]
    return _combine(v1, v2, n_narrow, top_k, with_groups=groups is not None)


def false_alarms(
    con: duckdb.DuckDBPyConnection,
    latents: pa.Table,
    *,
    roles: tuple[str, ...] | None = None,
    heldout: Sequence[int] | np.ndarray | None = None,
    n_labels: int | None = None,
    rate: float | None = None,
    draws: int = 5,
    seed: int = 0,
    capture_share: float = 0.8,
    coverage: float = 0.5,
    top_k: int = 10,
    groups: pa.Table | None = None,
) -> pa.Table:
    """The `false_alarms` table (schemas.FALSE_ALARMS): per order (SCORES, groups, frequency, firing_kl), how many of
    its top `top_k` capture a placebo label (recovery v2's test: precision and coverage on held-out documents), mean
    and max over `draws` seeded draws. Placebo labels: `n_labels` (default: the run's planted labels, else 3) disjoint
    sets of ordinary documents, each of round(`rate` x documents) (default: the planted labels' mean share of
    documents, else 0.1), at most an equal share of the ordinary documents. On a null organism (no narrow
    behaviour) every such entry is a false alarm; on a planted run it counts entries the test would wrongly credit.
    Each draw runs one query: the orders computed once as a table of their own did not finish in 2 minutes at 10 M
    rows (DuckDB 1.5.5; inside the draw's query, 0.6 s), so the draw-independent part is recomputed per draw."""
    views = view_names(con)
    docs = con.execute("SELECT doc_id, behaviour FROM docs ORDER BY doc_id").fetchall()
    ids = [d for d, _ in docs]
    ordinary = np.array([d for d, b in docs if b is None or b in ("", "none")], dtype=np.int64)
    planted = [b for _, b in docs if b not in (None, "", "none")]
    n_labels = n_labels or len(set(planted)) or 3
    rate = rate if rate is not None else (len(planted) / len(docs) / len(set(planted)) if planted else 0.1)
    size = min(round(rate * len(docs)), len(ordinary) // n_labels)
    if size < 1:
        raise ValueError(f"false alarms: {len(ordinary)} ordinary documents cannot hold {n_labels} placebo labels")
    roles_where = role_filter(con, roles)
    held_ids = pa.table({"doc_id": pa.array(np.asarray(ids if heldout is None else heldout, np.int64), pa.int64())})
    counts: dict[str, list[int]] = {}
    with registered(con, latents=_narrow_columns(latents), heldout=held_ids, groups=_group_ranks(groups)) as names:
        for draw in range(draws):
            perm = np.random.default_rng(seed + 7907 * draw).permutation(ordinary)
            label = {int(d): f"placebo_{i // size}" for i, d in enumerate(perm[: n_labels * size])}
            placebo = pa.table({"doc_id": pa.array(ids, pa.int64()), "behaviour": [label.get(d, "none") for d in ids]})
            with registered(con, placebo=placebo) as docs_name:
                sql = render(
                    load_sql("false_alarms.sql"),
                    captures=_captures_sql(_scored_docs_sql(views, roles_where, names["groups"]),
                                           docs_name["placebo"], names["heldout"]),  # fmt: skip
                    orders=_orders_sql(views, roles_where, names["latents"], names["groups"]),
                )
                args = {"precision": capture_share, "coverage": coverage, "top_k": top_k}
                for order, n in con.execute(sql, args).fetchall():
                    counts.setdefault(order, []).append(int(n))
    rows = [(o, float(np.mean(counts[o])), max(counts[o]), n_labels, size, draws)
            for o in SCORES + (GROUPS,) + BASELINES if o in counts]  # fmt: skip
    return schemas.from_rows(rows, schemas.FALSE_ALARMS)


def _combine(v1: list[tuple], v2: list[tuple], n_narrow: int, top_k: int, with_groups: bool) -> pa.Table:
    """One row per (order, behaviour): the scores (SCORES order), groups, then BASELINES, behaviours alphabetical."""
    old = {(s, b): (best, rec, frac) for s, b, best, rec, frac in v1}
    new = {(s, b): (best, rec, m, n) for s, b, best, rec, m, n in v2}
    behaviours = sorted({b for _, b in old} | {b for _, b in new})
    per_b = {b: next(((m, n) for (_, bb), (_, _, m, n) in new.items() if bb == b), (0, 0)) for b in behaviours}
    rows = []
    for order in SCORES + ((GROUPS,) if with_groups else ()) + BASELINES:
        for b in behaviours:
            best1, rec1, frac = old.get((order, b), (None, None, None))
            m, n = per_b[b]
            if order == "random":
                best2, rec2, expected = None, None, random_recovery(n_narrow, m, top_k)
            else:
                best2, rec2, _, _ = new.get((order, b), (None, False, m, n))
                expected = float(bool(rec2))
            rows.append((order, b, best1, rec1, frac, best2, rec2, expected, m, n))
    return schemas.from_rows(rows, schemas.RECOVERY)


def format_false_alarms(table: pa.Table) -> str:
    """One line per order: mean (max) false alarms in its top 10 over the draws."""
    if table.num_rows == 0:
        return "false alarms: not measured"
    r0 = table.slice(0, 1).to_pylist()[0]
    head = (f"false alarms (top-10 entries passing recovery v2 for a placebo label; {r0['n_labels']} labels of "
            f"{r0['docs_per_label']} ordinary documents, mean (max) over {r0['draws']} draws):")  # fmt: skip
    cells = [f"{r['score']} {r['false_alarms']:.1f} ({r['false_alarms_max']})" for r in table.to_pylist()]
    return "\n".join([head, ", ".join(cells)])


def _cells(per: dict[str, dict], behaviours: list[str], best: str, recovered: str) -> list[str]:
    out = []
    for b in behaviours:
        rank = per[b][best]
        out.append("-" if rank is None else f"{rank}{' *' if per[b][recovered] else ''}")
    return out


def format_recovery(table: pa.Table) -> str:
    """Aligned text: v1 (one line per score: top-10 capture fraction, each behaviour's best rank), then v2 (per
    score and baseline: best rank on held-out documents, behaviours recovered; random: expected recovery)."""
    if table.num_rows == 0:
        return "recovery: no planted behaviours in docs"
    rows = table.to_pylist()
    behaviours = sorted({r["behaviour"] for r in rows})
    by_order: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_order.setdefault(r["score"], {})[r["behaviour"]] = r
    v1 = [["score", "top10_capture"] + behaviours]
    for order, per in by_order.items():
        if order in BASELINES or order == GROUPS:
            continue
        v1.append([order, f"{next(iter(per.values()))['top10_capture_fraction']:.2f}"]
                  + _cells(per, behaviours, "best_rank", "recovered"))  # fmt: skip
    held = ", ".join(f"{b} {rows_b['n_heldout']}" for b, rows_b in next(iter(by_order.values())).items())
    v2 = [["order", "recovered"] + behaviours]
    for order, per in by_order.items():
        got = sum(per[b]["expected_v2"] or 0.0 for b in behaviours)
        if order == "random":
            v2.append([order, f"{got:.2f}"] + [f"p={per[b]['expected_v2']:.2f}" for b in behaviours])
        else:
            v2.append([order, f"{got:.0f}/{len(behaviours)}"] + _cells(per, behaviours, "best_rank_v2", "recovered_v2"))
    return "\n".join(
        ["recovery v1 (every document; precision >= 80 %):"]
        + _align(v1)
        + ["(cells: best rank of a latent capturing the behaviour; * = recovered, in the top 10)", ""]
        + [f"recovery v2 (held-out documents per behaviour: {held}; precision >= 80 % and coverage >= 50 %):"]
        + _align(v2)
        + ["(scores, then baselines over the same latents: frequency and firing-KL orders; random: expected"
           " recovery, p = chance a random order puts a capturing latent in the top 10)"]  # fmt: skip
    )


def _align(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
