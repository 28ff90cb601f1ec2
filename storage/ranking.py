"""Latent ranking, in DuckDB SQL over a run's Parquet tables.

Why: an auditor wants rare, high-impact behaviours at the top, and ranking by total KL attribution favours
frequent, broad-drift latents. So every latent gets several scores (SCORES, named in diffsae/config.py, defined
and documented in storage/sql/rank_latents.sql), each with its own `rank_<score>` column; `rank` follows
`attribution.rank_by`. Only the tokens of the analysed roles are scored, and latents that fire in (nearly) every
document are listed apart as broad changes (RankParams.roles, .broad_docs). storage/recovery.py measures whether
the ranking surfaces planted behaviours.

    con = storage.duck.connect(store, run)                      # views: latent_tokens, docs, tokens, ...
    latents = rank_latents(con, "focus", latent_dirs=dirs)     # pyarrow.Table, sorted by rank
    print(format_recovery(recovery(con, latents)))              # storage/recovery.py

The SQL lives in storage/sql/*.sql; `{{name}}` placeholders are relations or other SQL files inlined here,
`$name` are query parameters. Nothing is copied out of Parquet except the per-latent results.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa

from diffsae.config import SCORES, resolve_score
from storage import schemas
from storage.duck import view_names

SQL_DIR = Path(__file__).parent / "sql"

_EMPTY_DIRS = (
    "(SELECT NULL::INTEGER AS latent_id, NULL::VARCHAR[] AS promoted, NULL::VARCHAR[] AS suppressed"
    " WHERE false)"
)
_EMPTY_DOMINANT = (
    "SELECT NULL::INTEGER AS latent_id, NULL::VARCHAR AS dominant_behaviour, NULL::DOUBLE AS dominant_share"
    " WHERE false"
)
_counter = itertools.count()
# docs rows with a planted label (as in behaviour_mass.sql and recovery.sql): not NULL, '' or 'none'
PLANTED_DOCS = "behaviour IS NOT NULL AND behaviour NOT IN ('', 'none')"
# latents columns that exist only when docs has planted labels
DOMINANT_COLUMNS = ("dominant_behaviour", "dominant_share")


class RankParams(NamedTuple):
    min_support: int = 5  # firing tokens a latent needs for score_mean
    top_n: int = 5  # documents whose mass score_concentration keeps
    top_m: int = 3  # documents score_top_docs averages
    rrf_k: int = 60  # score_fusion's rank offset (Cormack et al. 2009's value: the top ranks do not dominate)
    roles: tuple[str, ...] | None = None  # token roles scored (None: every token); the pipeline passes rank.roles
    broad_docs: float | None = None  # document share that makes a latent broad (None: none is); rank.broad_docs


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, **tables: pa.Table | None) -> Iterator[dict[str, str | None]]:
    """Register each given Arrow table under a fresh name for the block (None stays None); unregistered after."""
    names = {k: None if t is None else f"__diffsae_{k}_{next(_counter)}" for k, t in tables.items()}
    done = []
    try:
        for key, name in names.items():
            if name is not None:
                con.register(name, tables[key])
                done.append(name)
        yield names
    finally:
        for name in done:
            con.unregister(name)


def sql_fingerprint() -> str:
    """sha256 of every storage/sql file: part of the rank stage's cache key, so editing a score reranks."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(SQL_DIR.glob("*.sql")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def load_sql(name: str) -> str:
    """A storage/sql file without its full-line `--` comments (the header documents the placeholders)."""
    lines = (SQL_DIR / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("--"))


def render(sql: str, **parts: str) -> str:
    """Replace every `{{key}}` by parts[key]; a leftover placeholder is a bug."""
    for key, value in parts.items():
        sql = sql.replace("{{" + key + "}}", value)
    if "{{" in sql:
        raise RuntimeError(f"unfilled placeholder in SQL: {sql[sql.index('{{') : sql.index('{{') + 40]}")
    return sql


def role_filter(con: duckdb.DuckDBPyConnection, roles: tuple[str, ...] | None) -> str | None:
    """SQL condition on `tokens.role` for the analysed roles, or None when every token of the run is analysed
    (no filter: the ranking reads the latent_docs table as written)."""
    if roles is None:
        return None
    if "tokens" not in view_names(con):
        raise ValueError("a role filter needs the run's tokens table (analysis/tokens.parquet)")
    present = {r for (r,) in con.execute("SELECT DISTINCT role FROM tokens").fetchall()}
    if present <= set(roles):
        return None
    return "role IN (" + ", ".join("'" + r.replace("'", "''") + "'" for r in sorted(roles)) + ")"


def latent_docs_sql(views: list[str], planted_only: bool = False, roles_where: str | None = None) -> str:
    """The (latent, document) relation: the run's `latent_docs` table, or latent_docs.sql over latent_tokens when
    the run lacks it or only the tokens matching `roles_where` (a role_filter condition) count; restricted to
    planted documents when `planted_only` (all behaviour_mass.sql needs)."""
    if "latent_docs" in views and roles_where is None:
        return "latent_docs"
    if "latent_tokens" not in views:
        raise ValueError("the run has no latent_tokens table (analysis/latent_tokens/*.parquet)")
    where = f"doc_id IN (SELECT doc_id FROM docs WHERE {PLANTED_DOCS})" if planted_only else "true"
    source = "latent_tokens"
    if roles_where is not None:
        source = (
            "(SELECT lt.* FROM latent_tokens AS lt SEMI JOIN (SELECT doc_id, pos FROM tokens WHERE "
            f"{roles_where}) AS t ON t.doc_id = lt.doc_id AND t.pos = lt.pos)"
        )
    return "(" + render(load_sql("latent_docs.sql"), latent_tokens=source, where=where) + ")"


def behaviour_mass_sql(views: list[str], roles_where: str | None = None) -> str:
    ld = latent_docs_sql(views, planted_only=True, roles_where=roles_where)
    return render(load_sql("behaviour_mass.sql"), latent_docs=ld, docs="docs")


def count_docs(con: duckdb.DuckDBPyConnection) -> int:
    """Documents: rows of `docs` if the run has it, else distinct doc_id of latent_tokens."""
    if "docs" in view_names(con):
        return con.execute("SELECT count(*) FROM docs").fetchone()[0]
    return con.execute("SELECT count(DISTINCT doc_id) FROM latent_tokens").fetchone()[0]


def has_planted(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the run's docs table labels some document with a behaviour other than 'none'."""
    if "docs" not in view_names(con):
        return False
    q = f"SELECT count(*) FROM docs WHERE {PLANTED_DOCS}"
    return con.execute(q).fetchone()[0] > 0


def count_tokens(con: duckdb.DuckDBPyConnection, roles_where: str | None = None) -> int:
    """Analysed tokens: rows of `tokens` (those matching `roles_where`) if the run has it, else distinct
    (doc_id, pos) of latent_tokens."""
    if "tokens" in view_names(con):
        return con.execute(f"SELECT count(*) FROM tokens WHERE {roles_where or 'true'}").fetchone()[0]
    return con.execute("SELECT count(*) FROM (SELECT DISTINCT doc_id, pos FROM latent_tokens)").fetchone()[0]


def rank_latents(
    con: duckdb.DuckDBPyConnection,
    rank_by: str = "total",
    latent_dirs: pa.Table | None = None,
    *,
    n_tokens: int | None = None,
    params: RankParams = RankParams(),
) -> pa.Table:
    """The latents table (DESIGN.md), sorted by rank then rank_broad: statistics on the analysed tokens
    (`params.roles`), n_docs, pos_mass, doc_share[_all], pos_mass_all, score_<s> and rank_<s> for s in SCORES
    (narrow latents only), rank_broad (broad latents: `params.broad_docs`), `rank` (by `rank_by`),
    dominant_behaviour/dominant_share (only when docs has planted labels), promoted/suppressed (from
    `latent_dirs(latent_id, promoted, suppressed)`, NULL without it). Its schema is
    storage.schemas.latents_schema(SCORES) (less the dominant_* columns without planted labels). `n_tokens`: the
    analysed tokens (frequency denominator; default: the tokens of the analysed roles)."""
    score = resolve_score(rank_by)
    views = view_names(con)
    planted = has_planted(con)
    if not 1 <= params.top_m <= params.top_n:
        raise ValueError(
            f"RankParams: need 1 <= top_m <= top_n, got top_m={params.top_m}, top_n={params.top_n}"
        )
    roles_where = role_filter(con, params.roles)
    dominant = _EMPTY_DOMINANT
    if planted:
        dominant = render(load_sql("dominant_behaviour.sql"), behaviour_mass=behaviour_mass_sql(views, roles_where))
    n = n_tokens if n_tokens is not None else count_tokens(con, roles_where)
    args = {
        "n_tokens": max(n, 1),
        "n_docs": max(count_docs(con), 1),
        "broad_docs": 2.0 if params.broad_docs is None else float(params.broad_docs),
        "min_support": params.min_support,
        "top_n": params.top_n,
        "top_m": params.top_m,
        "rrf_k": params.rrf_k,
    }
    dirs = None if latent_dirs is None else latent_dirs.select(["latent_id", "promoted", "suppressed"])
    with registered(con, latent_dirs=dirs) as names:
        sql = render(
            load_sql("rank_latents.sql"),
            latent_docs=latent_docs_sql(views, roles_where=roles_where),
            latent_docs_all=latent_docs_sql(views),
            dominant=dominant,
            latent_dirs=names["latent_dirs"] or _EMPTY_DIRS,
            rank_by=score,
        )
        table = con.execute(sql, args).to_arrow_table()
    schema = schemas.latents_schema(SCORES)
    if not planted:
        table = table.drop_columns(list(DOMINANT_COLUMNS))
        schema = pa.schema([f for f in schema if f.name not in DOMINANT_COLUMNS])
    if table.column_names != schema.names:  # the SQL and storage/schemas.py disagree: a bug, not bad data
        raise RuntimeError(
            f"rank_latents.sql returned columns {table.column_names}, storage/schemas.py expects {schema.names}"
        )
    return table.cast(schema)
