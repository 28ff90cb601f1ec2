"""Stage 4 task: rank latents with DuckDB SQL (storage/sql/) over the analysis tables.

Writes `latents`, `latent_groups` (storage/groups.py), `false_alarms` (placebo labels) and, when the data has
behaviour labels, `recovery` (v1 and v2 with baselines; logged to the SAE's MLflow run with the false alarms);
`analysis/ranking.json`, written last, is the stage's marker. Keyed on the attribution key, `rank_by`, the `rank`
section (analysed roles, broad share) and the SQL files (editing a score reranks). `diffsae eval` calls
`evaluate_run` (no recompute; it reads the roles the run was ranked with from the marker).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from diffsae.config import RankConfig, SAEConfig
from diffsae.split import heldout_docs
from storage import groups as storage_groups
from storage import ranking, schemas
from storage import recovery as storage_recovery
from storage.context import RunContext
from storage.groups import latent_groups
from storage.recovery import false_alarms, format_false_alarms, format_recovery, recovery
from tasks.common import IO_RETRY, STAGE_CACHE, code_version, read_marker, stage_key, write_marker

TOP_REPORTED = 10  # latents listed in the stage's result (the CLI's end-of-run report)


class RankingResult(NamedTuple):
    """The rank stage's summary (`analysis/ranking.json`)."""

    key: str
    rank_by: str  # the score `rank` follows (aliases resolved)
    n_latents: int  # latents that fire (rows of `latents`)
    top: list[dict[str, Any]]  # the first TOP_REPORTED rows: rank, latent_id, kl_attr_sum[, dominant_behaviour]
    recovery: list[dict[str, Any]]  # rows of `recovery` (empty without behaviour labels)
    recovery_text: str
    roles: list[str]  # the analysed token roles (rank.roles)
    broad_docs: float  # rank.broad_docs
    n_broad: int  # latents with a rank_broad
    broad: list[dict[str, Any]]  # the first TOP_REPORTED broad latents: rank_broad, latent_id, doc_share_all, ...
    # The default list (issue 15, chosen on the organism benchmark's selection set): the first TOP_REPORTED latent
    # groups, group_rank, group_id (its leader), n_members, members (rank order), kl_attr_sum (of the members)[,
    # dominant_behaviour of the leader]
    groups: list[dict[str, Any]] = []


def rank_key(rank_by: str, cfg: RankConfig, attribution_key: str) -> str:
    settings = (ranking.resolve_score(rank_by), cfg.model_dump())
    code = code_version(ranking, storage_recovery, storage_groups)  # what the stage computes with, besides the SQL
    return stage_key("ranking", rank, settings, attribution_key, ranking.sql_fingerprint(), code)


def rank_params(cfg: RankConfig) -> ranking.RankParams:
    return ranking.RankParams(roles=tuple(cfg.roles), broad_docs=cfg.broad_docs)


def rank_done(ctx: RunContext, key: str) -> RankingResult | None:
    return read_marker(ctx.store, ctx.paths.marker("ranking"), key, RankingResult)


def rank(ctx: RunContext, rank_by: str, cfg: RankConfig, skip_first: int, key: str) -> RankingResult:
    """DuckDB SQL over the analysis tables -> `latents` and, with behaviour labels, `recovery`."""
    done = rank_done(ctx, key)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    con = ctx.duck()
    dirs = store.read_parquet(paths.table("latent_dirs"))
    params = rank_params(cfg)
    roles_where = ranking.role_filter(con, params.roles) or "true"
    q = f"SELECT count(*) FROM tokens WHERE pos >= {int(skip_first)} AND {roles_where}"
    analysed = con.execute(q).fetchone()[0]
    latents = ranking.rank_latents(con, rank_by, latent_dirs=dirs, n_tokens=int(analysed), params=params)
    groups = latent_groups(con, latents, roles=params.roles, top=cfg.group_top, min_jaccard=cfg.group_jaccard,
                           by=cfg.group_by)
    store.write_parquet(paths.table("latents"), latents)
    store.write_parquet(paths.table("latent_groups"), groups)
    rec, alarms, text = judge(ctx, con, latents, params.roles, groups)
    columns = ["rank", "latent_id", "kl_attr_sum"]
    columns += ["dominant_behaviour"] if "dominant_behaviour" in latents.column_names else []
    out = RankingResult(
        key=key,
        rank_by=ranking.resolve_score(rank_by),
        n_latents=latents.num_rows,
        top=latents.filter(pc.is_valid(latents["rank"])).slice(0, TOP_REPORTED).select(columns).to_pylist(),
        recovery=rec.to_pylist(),
        recovery_text=text,
        roles=list(cfg.roles),
        broad_docs=cfg.broad_docs,
        n_broad=int(pc.sum(pc.is_valid(latents["rank_broad"])).as_py() or 0),
        broad=broad_top(latents),
        groups=groups_top(groups, latents),
    )
    write_marker(store, paths.marker("ranking"), out)  # last: marks the stage complete
    return out


def groups_top(groups: pa.Table, latents: pa.Table) -> list[dict[str, Any]]:
    """The first TOP_REPORTED latent groups: leader, members in rank order, summed attribution, leader's behaviour."""
    attr = dict(zip(latents["latent_id"].to_pylist(), latents["kl_attr_sum"].to_pylist()))
    dom = dict(zip(latents["latent_id"].to_pylist(), latents["dominant_behaviour"].to_pylist())) \
        if "dominant_behaviour" in latents.column_names else None  # fmt: skip
    out: dict[int, dict[str, Any]] = {}
    for r in sorted(groups.to_pylist(), key=lambda r: (r["group_rank"], r["rank"])):
        if r["group_rank"] > TOP_REPORTED:
            continue
        new = {"group_rank": r["group_rank"], "group_id": r["group_id"], "n_members": r["n_members"], "members": [],
               "kl_attr_sum": 0.0}  # fmt: skip
        g = out.setdefault(r["group_rank"], new)
        if len(g["members"]) < 20:  # the first 20 members; n_members counts them all
            g["members"].append(r["latent_id"])
        g["kl_attr_sum"] += attr.get(r["latent_id"]) or 0.0
        if dom is not None:
            g["dominant_behaviour"] = dom.get(r["group_id"])
    return [out[k] for k in sorted(out)]


def broad_top(latents: pa.Table) -> list[dict[str, Any]]:
    """The first TOP_REPORTED broad latents (by rank_broad) with their document shares and mass."""
    broad = latents.filter(pc.is_valid(latents["rank_broad"])).sort_by("rank_broad").slice(0, TOP_REPORTED)
    columns = ["rank_broad", "latent_id", "doc_share_all", "doc_share", "pos_mass_all"]
    columns += ["dominant_behaviour"] if "dominant_behaviour" in latents.column_names else []
    return broad.select(columns).to_pylist()


@task(name="rank", cache_policy=STAGE_CACHE, **IO_RETRY)
def rank_task(
    ctx: RunContext, rank_by: str, cfg: RankConfig, skip_first: int, attribution_key: str, key: str
) -> RankingResult:
    return rank(ctx, rank_by, cfg, skip_first, key)


def judge(
    ctx: RunContext, con: Any, latents: pa.Table, roles: tuple[str, ...] | None, groups: pa.Table | None
) -> tuple[pa.Table, pa.Table, str]:
    """Recovery (v1, v2 on the SAE's held-out documents) and false alarms of a ranking, published (tables, MLflow);
    returns both tables and their text. False alarms are empty when there are too few ordinary documents."""
    heldout = sae_heldout(ctx, con)
    rec = recovery(con, latents, roles=roles, heldout=heldout, groups=groups)
    try:
        alarms = false_alarms(con, latents, roles=roles, heldout=heldout, groups=groups)
    except ValueError:
        alarms = schemas.FALSE_ALARMS.empty_table()
    publish_recovery(ctx, rec, alarms)
    return rec, alarms, format_recovery(rec) + "\n\n" + format_false_alarms(alarms)


def publish_recovery(ctx: RunContext, rec: pa.Table, alarms: pa.Table) -> None:
    """Write the `recovery` and `false_alarms` tables and log them to the SAE's MLflow run."""
    store, paths = ctx.store, ctx.paths
    if alarms.num_rows:
        store.write_parquet(paths.table("false_alarms"), alarms)
    else:
        store.delete(paths.table("false_alarms"))
    if not rec.num_rows:
        store.delete(paths.table("recovery"))
    else:
        store.write_parquet(paths.table("recovery"), rec)
    if not rec.num_rows and not alarms.num_rows:
        return
    try:
        run_id = store.read_json(paths.marker("sae")).get("mlflow_run_id")
    except FileNotFoundError:
        run_id = None
    if not run_id:
        return
    ctx.mlflow_experiment()
    rows = rec.to_pylist()
    metrics: dict[str, float] = {}
    for r in rows:
        key = f"recovery.{r['score']}"
        if r["top10_capture_fraction"] is not None:  # v1: scores only
            metrics[f"{key}.{r['behaviour']}.best_rank"] = float(r["best_rank"] or -1)
            metrics[f"{key}.top10_capture_fraction"] = float(r["top10_capture_fraction"])
        metrics[f"{key}.{r['behaviour']}.best_rank_v2"] = float(r["best_rank_v2"] or -1)
    for score in {r["score"] for r in rows}:
        per = [r for r in rows if r["score"] == score]
        if per[0]["top10_capture_fraction"] is not None:
            metrics[f"recovery.{score}.recovered_fraction"] = sum(bool(r["recovered"]) for r in per) / len(per)
        metrics[f"recovery.{score}.recovered_fraction_v2"] = sum(r["expected_v2"] or 0.0 for r in per) / len(per)
    for r in alarms.to_pylist():
        metrics[f"false_alarms.{r['score']}"] = float(r["false_alarms"])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)


def evaluate_run(ctx: RunContext) -> str:
    """`diffsae eval`: recovery of the planted behaviours for every score, from the run's tables (no recompute)."""
    con = ctx.duck()
    if "latents" not in ranking.view_names(con):
        raise FileNotFoundError(f"run '{ctx.run}' has no latents table on {ctx.store_url}: run the pipeline first")
    try:
        roles = ctx.store.read_json(ctx.paths.marker("ranking")).get("roles")
    except FileNotFoundError:
        roles = None  # no marker (or one from before rank.roles existed): every token was scored
    latents = con.execute("SELECT * FROM latents").to_arrow_table()
    views = ranking.view_names(con)
    groups = con.execute("SELECT * FROM latent_groups").to_arrow_table() if "latent_groups" in views else None
    return judge(ctx, con, latents, tuple(roles) if roles else None, groups)[2]


def sae_heldout(ctx: RunContext, con: Any) -> list[int] | None:
    """Doc ids the run's SAE never trained on, redrawn from its config (diffsae/split.py); None when the SAE's
    config is unknown (recovery v2 then reads every document and says so)."""
    try:
        sae_cfg = ctx.store.read_json(ctx.paths.url("sae", "cfg.json")).get("sae_config")
    except FileNotFoundError:
        return None
    if not sae_cfg:
        return None
    return heldout_docs(ranking.count_docs(con), SAEConfig.model_validate(sae_cfg)).tolist()
