"""DuckDB over a run's Parquet tables: one view per table, local or on S3, never copying data.

Why: every analysis table of a run (storage/schemas.py TABLES) is Parquet under `<store>/runs/<run>/`;
DuckDB reads them in place, so ranking (storage/ranking.py), `diffsae sql` (storage/sql_cli.py) and any
DuckDB client see the same tables under the same names.

    con = connect(RunContext.create("./diffsae-data", "demo"))   # views: docs, tokens, latent_tokens, ...
    con.sql("SELECT count(*) FROM latent_tokens")
    print(catalog_sql(ctx))                                      # the same views for the DuckDB CLI

S3 goes through the httpfs extension shipped by the PyPI package `duckdb-extension-httpfs` (DuckDB cannot
download extensions here). The package's `__init__` is empty; it only holds the file
`duckdb_extension_httpfs/extensions/v<duckdb version>/httpfs.duckdb_extension`, which we LOAD by path.
Credentials become a temporary DuckDB SECRET (TYPE s3, URL_STYLE 'path', scoped to the store's bucket).

Hardening (`harden_connection=True`, the default): once the views exist, the connection gets
`allowed_directories = [<run root>/]`, `enable_external_access = false`, `python_enable_replacements =
false` and `lock_configuration = true`. DuckDB 1.5.5 then still reads the views (their files lie under the
run root) but refuses any other file or URL, any LOAD/INSTALL and any further SET; storage/sql_guard.py
adds a statement-level check. Tables written after `connect` are not visible: connect after the writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, get_args
from urllib.parse import urlparse

import duckdb

from diffsae.config import Method
from storage.paths import RunPaths, is_s3, join
from storage.schemas import TABLES
from storage.store import s3_endpoint

if TYPE_CHECKING:
    from storage.context import RunContext


class S3Settings(NamedTuple):
    """Where and how to reach S3. `from_env` reads the standard AWS_* variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 (None: AWS)
    key_id: str | None = None
    secret: str | None = None
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> "S3Settings":
        return cls(
            endpoint_url=s3_endpoint(endpoint_url),
            key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def httpfs_extension_path() -> str:
    """The httpfs extension file inside the `duckdb-extension-httpfs` package, for this DuckDB version."""
    try:
        import duckdb_extension_httpfs
    except ImportError:
        raise RuntimeError(
            "S3 stores need the httpfs extension: pip install duckdb-extension-httpfs"
        ) from None
    path = (
        Path(duckdb_extension_httpfs.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "httpfs.duckdb_extension"
    )
    if not path.is_file():
        raise RuntimeError(f"httpfs extension for DuckDB {duckdb.__version__} not found at {path}")
    return str(path)


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _secret_options(store_root: str, s3: S3Settings) -> list[str]:
    opts = ["TYPE s3", f"REGION {sql_str(s3.region)}", "URL_STYLE 'path'"]
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url if "://" in s3.endpoint_url else "http://" + s3.endpoint_url)
        opts.append(f"ENDPOINT {sql_str(parsed.netloc)}")
        opts.append(f"USE_SSL {'false' if parsed.scheme == 'http' else 'true'}")
    bucket = store_root[len("s3://") :].split("/", 1)[0]
    opts.append(f"SCOPE {sql_str('s3://' + bucket)}")
    return opts


def setup_s3(con: duckdb.DuckDBPyConnection, store_root: str, s3: S3Settings | None) -> None:
    """LOAD httpfs from the pip package and create the S3 secret (credentials as literals, never logged)."""
    s3 = s3 or S3Settings.from_env()
    con.execute(f"LOAD {sql_str(httpfs_extension_path())}")
    opts = _secret_options(store_root, s3)
    if s3.key_id and s3.secret:
        opts += [f"KEY_ID {sql_str(s3.key_id)}", f"SECRET {sql_str(s3.secret)}"]
    con.execute(f"CREATE OR REPLACE TEMPORARY SECRET diffsae_s3 ({', '.join(opts)})")


def existing_tables(con: duckdb.DuckDBPyConnection, paths: RunPaths) -> dict[str, str]:
    """name -> URL (or glob) of the run's tables that have at least one file (DuckDB's glob, local or S3)."""
    found: dict[str, str] = {}
    for name in TABLES:
        url = paths.table(name)
        # DuckDB's S3 glob returns a pattern without wildcards unchecked: make the last character a class.
        pattern = url if any(c in url for c in "*?[") else f"{url[:-1]}[{url[-1]}]"
        if con.execute("SELECT count(*) FROM glob(?)", [pattern]).fetchone()[0] > 0:
            found[name] = url
    return found


def method_views(con: duckdb.DuckDBPyConnection, paths: RunPaths) -> dict[str, dict[str, str]]:
    """method -> {table: URL} of the run's other methods that have tables of their own (`crosscoder.latents`)."""
    out: dict[str, dict[str, str]] = {}
    default_cfg = RunPaths(paths.store, paths.run).url("sae", "cfg.json")
    found: set[str] = set()
    for pattern in (join(paths.methods_root, "*", "sae", "cfg.json"), f"{default_cfg[:-1]}[{default_cfg[-1]}]"):
        found |= {r[0] for r in con.execute("SELECT file FROM glob(?)", [pattern]).fetchall()}
    for method in get_args(Method):
        other = RunPaths(paths.store, paths.run, method)
        if method == paths.method or other.url("sae", "cfg.json") not in found:
            continue
        views = {n: u for n, u in existing_tables(con, other).items() if u != paths.table(n)}  # not the shared ones
        if views:
            out[method] = views
    return out


def view_sql(name: str, url: str) -> str:
    return f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({sql_str(url)})"


def harden(con: duckdb.DuckDBPyConnection, root: str) -> None:
    """Allow file access only under `root`, then lock the configuration (no SET, LOAD, INSTALL afterwards)."""
    con.execute(f"SET allowed_directories = [{sql_str(root.rstrip('/') + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET python_enable_replacements = false")
    con.execute("SET lock_configuration = true")


def connect(
    ctx: "RunContext", s3: S3Settings | None = None, *, harden_connection: bool = True
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per existing table of the run (see module docstring)."""
    paths = ctx.paths
    con = duckdb.connect(":memory:")
    if is_s3(paths.store_root):
        setup_s3(con, paths.store_root, s3 or S3Settings.from_env(ctx.endpoint_url))
    for name, url in existing_tables(con, paths).items():
        con.execute(view_sql(name, url))
    for schema, views in method_views(con, paths).items():  # the run's other methods: <method>.<table>
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for name, url in views.items():
            con.execute(view_sql(f"{schema}.{name}", url))
    if harden_connection:
        harden(con, paths.root)
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' ORDER BY view_name"
    ).fetchall()
    return [r[0] for r in rows]


def catalog_sql(ctx: "RunContext", s3: S3Settings | None = None, *, cli_env: bool = True) -> str:
    """SQL that creates the run's views in any DuckDB 1.5.5 client (CLI: `duckdb -init catalog.sql`).

    Credentials are never written out. The S3 secret reads them from two DuckDB variables, `diffsae_key_id`
    and `diffsae_secret`. With `cli_env=True` the script sets them from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY with `getenv` (a function of the DuckDB CLI only); with `cli_env=False` those lines
    are comments and the client sets the variables itself, e.g.
    `con.execute("SET VARIABLE diffsae_key_id = ?", [key])`.
    """
    paths, run = ctx.paths, ctx.run
    lines = [
        f"-- diffsae catalog: run {run!r} in {paths.store_root}",
        "-- One view per Parquet table of the run; the data stays where it is.",
        "-- Generated by `diffsae sql --catalog`.",
    ]
    probe = duckdb.connect(":memory:")
    try:
        if is_s3(paths.store_root):
            s3 = s3 or S3Settings.from_env(ctx.endpoint_url)
            setup_s3(probe, paths.store_root, s3)
            ext = httpfs_extension_path()
            set_vars = [
                "SET VARIABLE diffsae_key_id = getenv('AWS_ACCESS_KEY_ID');",
                "SET VARIABLE diffsae_secret = getenv('AWS_SECRET_ACCESS_KEY');",
            ]
            lines += [
                "-- httpfs from the PyPI package duckdb-extension-httpfs (or: INSTALL httpfs; LOAD httpfs;)",
                f"LOAD {sql_str(ext)};",
                "-- credentials come from the variables diffsae_key_id / diffsae_secret",
                *(set_vars if cli_env else ["-- " + s for s in set_vars]),
                "CREATE OR REPLACE SECRET diffsae_s3 ("
                + ", ".join(
                    _secret_options(paths.store_root, s3)
                    + ["KEY_ID getvariable('diffsae_key_id')", "SECRET getvariable('diffsae_secret')"]
                )
                + ");",
            ]
        tables = existing_tables(probe, paths)
    finally:
        probe.close()
    if not tables:
        lines.append(f"-- no tables found under {paths.root}")
    lines += [view_sql(name, url) + ";" for name, url in tables.items()]
    return "\n".join(lines) + "\n"
