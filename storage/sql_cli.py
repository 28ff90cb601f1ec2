"""`diffsae sql`: read-only SQL over a run's Parquet tables, and the catalog SQL for other DuckDB clients.

    diffsae sql "SELECT latent_id, rank, score_focus FROM latents ORDER BY rank LIMIT 10"
    diffsae sql "SHOW TABLES" --store s3://bucket/team --run demo --format json
    diffsae sql --catalog > catalog.sql && duckdb -init catalog.sql      # the same views in the DuckDB CLI

The store and run come from --store/--run, else from --config FILE (keys `store`, `run`,
`s3_endpoint_url`), else `./diffsae-data` and `demo`. Views are storage/duck.py's (one per existing table);
queries pass through storage/sql_guard.py (SELECT, WITH, FROM, VALUES, TABLE, DESCRIBE, SHOW, SUMMARIZE,
EXPLAIN only; no file outside the run). Output: `table` (aligned text), `csv` (with header) or `json` (a
list of objects). Any error: one line on stderr, exit code 2. diffsae/cli.py wires `add_parser` and `run`
in; `python -m storage.sql_cli sql ...` runs it standalone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from typing import Any

from storage.context import RunContext
from storage.sql_guard import QueryResult


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sql", help="read-only SQL over a run's Parquet tables (DuckDB views)")
    p.add_argument("query", nargs="?", help="one SELECT/WITH/DESCRIBE/SHOW/EXPLAIN statement")
    p.add_argument(
        "--store", default=None, help="artifact store: folder or s3://bucket/prefix (./diffsae-data)"
    )
    p.add_argument("--run", default=None, help="run name (demo)")
    p.add_argument("--config", default=None, help="pipeline YAML giving store, run and s3_endpoint_url")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=None, help="print at most this many rows")
    p.add_argument(
        "--catalog", action="store_true", help="print SQL creating the run's views, for any client"
    )
    p.set_defaults(func=run)
    return p


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def format_table(res: QueryResult) -> str:
    cells = [[_cell(v) for v in row] for row in res.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(res.columns)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in res.rows)
        for i in range(len(widths))
    ]

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(out).rstrip()

    rows = [line(list(res.columns)), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(rows + [f"({len(res.rows)} row{'s' if len(res.rows) != 1 else ''})"]) + "\n"


def format_csv(res: QueryResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(res.columns)
    w.writerows([["" if v is None else v for v in row] for row in res.rows])
    return buf.getvalue()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # Decimal, dates, blobs, ...


def format_json(res: QueryResult) -> str:
    return (
        json.dumps([{c: _jsonable(v) for c, v in zip(res.columns, row)} for row in res.rows], indent=1) + "\n"
    )


FORMATS = {"table": format_table, "csv": format_csv, "json": format_json}


def resolve(args: argparse.Namespace) -> RunContext:
    """The run context from the flags, then --config, then the PipelineConfig defaults."""
    from diffsae.config import PipelineConfig

    cfg = PipelineConfig.from_yaml(args.config, overrides={"store": args.store, "run": args.run})
    return RunContext.from_config(cfg)


def run(args: argparse.Namespace) -> int:
    from storage.duck import catalog_sql, connect
    from storage.sql_guard import run_query

    try:
        ctx = resolve(args)
        if args.catalog:
            sys.stdout.write(catalog_sql(ctx))
            return 0
        if not args.query:
            raise ValueError('give a query, e.g. diffsae sql "SHOW TABLES", or --catalog')
        con = connect(ctx)
        try:
            res = run_query(con, args.query, ctx.paths.root, max_rows=args.max_rows)
        finally:
            con.close()
        sys.stdout.write(FORMATS[args.format](res))
        return 0
    except Exception as e:  # every failure is one line on stderr (SQLRefused, SQLError, ConfigError, I/O)
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"diffsae sql: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m storage.sql_cli sql "QUERY" ...` (same flags as `diffsae sql`)."""
    parser = argparse.ArgumentParser(prog="diffsae")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
