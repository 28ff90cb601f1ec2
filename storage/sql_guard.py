"""Read-only SQL over a run: the statement-level guard behind `diffsae sql`.

Why: `diffsae sql "QUERY"` lets anyone query a run's tables; it must neither write (COPY, CREATE, INSERT,
EXPORT, ATTACH...), nor change the engine (SET, PRAGMA, LOAD, INSTALL), nor read files outside the run.

How (two layers):
1. This module parses the text with DuckDB itself (`duckdb.extract_statements`, then `json_serialize_sql`
   for the parsed tree). Exactly one statement; it starts with SELECT, WITH, FROM (DuckDB's `FROM t`
   shorthand, allowed), VALUES, TABLE, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN [ANALYZE] (whose inner statement
   is checked the same way); its type is SELECT; every file-reading table function (read_parquet, read_csv,
   glob, ...) and every file-path table name (`FROM '/x.csv'`) in the tree names string literals under the
   run root; `query()`/`query_table()` (SQL in a string) and the secret functions are refused.
2. storage/duck.py's hardened connection (`enable_external_access=false` with `allowed_directories=[run
   root]`, `lock_configuration=true`) makes DuckDB itself refuse any other file, even one the guard missed.

Each refusal raises `SQLRefused` (a ValueError) with a one-line message; DuckDB errors become `SQLError`.

    cols, rows = run_query(con, "SELECT latent_id, rank FROM latents LIMIT 5")
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, NamedTuple

import duckdb


class SQLRefused(ValueError):
    """A query `diffsae sql` does not run (one line)."""


class SQLError(ValueError):
    """A read-only query that DuckDB could not run (one line: DuckDB's first error line)."""


class QueryResult(NamedTuple):
    columns: list[str]
    rows: list[tuple[Any, ...]]


ALLOWED_STARTS = ("SELECT", "WITH", "FROM", "VALUES", "TABLE", "DESCRIBE", "SHOW", "SUMMARIZE", "EXPLAIN")

# Table functions whose first argument is a file path, a glob or a list of them.
FILE_FUNCTIONS = {
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "parquet_bloom_probe", "read_csv", "read_csv_auto", "sniff_csv", "read_json",
    "read_json_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson", "read_ndjson_auto",
    "read_ndjson_objects", "read_text", "read_blob", "glob", "read_xlsx", "iceberg_scan", "iceberg_metadata",
    "iceberg_snapshots", "delta_scan", "read_avro", "st_read", "sqlite_scan", "read_duckdb",
}  # fmt: skip
# Table functions refused outright: SQL hidden in a string, or secret metadata.
DENIED_FUNCTIONS = {"query", "query_table", "duckdb_secrets", "which_secret", "duckdb_secret_types"}

_PATHLIKE = re.compile(
    r"[/\\]|://|\.(parquet|csv|tsv|json|jsonl|ndjson|txt|gz|zst|arrow|db|duckdb|xlsx)$", re.I
)
_EXPLAIN = re.compile(r"EXPLAIN\s+(ANALY[SZ]E\s+)?(\(\s*(FORMAT|ANALY[SZ]E)\b[^)]*\)\s*)?", re.I)

_local = threading.local()


def _parser() -> duckdb.DuckDBPyConnection:
    """A private in-memory connection used only to parse (json_serialize_sql is built into the wheel)."""
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect(":memory:")
    return con


def strip_leading(sql: str) -> str:
    """`sql` without leading whitespace, comments and opening parentheses."""
    s = sql
    while True:
        s = s.lstrip()
        if s.startswith("--"):
            s = s.split("\n", 1)[1] if "\n" in s else ""
        elif s.startswith("/*"):
            end = s.find("*/")
            s = s[end + 2 :] if end >= 0 else ""
        elif s.startswith("("):
            s = s[1:]
        else:
            return s


def first_keyword(sql: str) -> str:
    m = re.match(r"[A-Za-z_]+", strip_leading(sql))
    return m.group(0).upper() if m else ""


def inside(path: str, root: str) -> bool:
    """Whether `path` (a file, glob or URL) lies under `root`, after resolving `..` and relative paths."""
    if "://" in root:
        if not path.startswith(root.rstrip("/") + "/"):
            return False
        return ".." not in path[len(root) :].split("/")
    if "://" in path or path.startswith("~"):
        return False
    full = os.path.normpath(os.path.join(os.getcwd(), path))
    root = os.path.normpath(root)
    return full == root or full.startswith(root + os.sep)


def _string_args(node: dict[str, Any]) -> list[str] | None:
    """String literals of a function's first argument (a literal or a list of them); None otherwise."""
    children = node.get("children") or []
    if not children:
        return []
    arg = children[0]
    if arg.get("class") == "CONSTANT" and arg["value"].get("type", {}).get("id") == "VARCHAR":
        return [arg["value"]["value"]]
    if arg.get("class") == "FUNCTION" and arg.get("function_name") == "list_value":
        out = []
        for c in arg.get("children") or []:
            if c.get("class") != "CONSTANT" or c["value"].get("type", {}).get("id") != "VARCHAR":
                return None
            out.append(c["value"]["value"])
        return out
    return None


def _walk(node: Any, root: str) -> None:
    if isinstance(node, list):
        for x in node:
            _walk(x, root)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TABLE_FUNCTION":
        fn = node.get("function") or {}
        name = str(fn.get("function_name", "")).lower()
        if name in DENIED_FUNCTIONS:
            raise SQLRefused(f"refused: table function {name}() is not allowed")
        if name in FILE_FUNCTIONS:
            paths = _string_args(fn)
            if paths is None:
                raise SQLRefused(f"refused: {name}() needs string-literal paths under the run root {root}")
            for p in paths:
                if not inside(p, root):
                    raise SQLRefused(f"refused: {name}({p!r}) reads outside the run root {root}")
    elif kind == "BASE_TABLE":
        name = str(node.get("table_name", ""))
        if _PATHLIKE.search(name) and not inside(name, root):
            raise SQLRefused(f"refused: {name!r} reads outside the run root {root}")
    for value in node.values():
        if isinstance(value, (dict, list)):
            _walk(value, root)


def check_query(query: str, root: str) -> str:
    """`query` if it is one read-only statement reading nothing outside `root`, else SQLRefused."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLRefused(f"cannot parse: {str(e).splitlines()[0]}") from None
    if not statements:
        raise SQLRefused("empty query")
    if len(statements) > 1:
        raise SQLRefused(f"refused: one statement per query, got {len(statements)}")
    keyword = first_keyword(query)
    if keyword not in ALLOWED_STARTS:
        raise SQLRefused(f"refused: {keyword or 'this statement'} (read-only: {', '.join(ALLOWED_STARTS)})")
    stmt_type = statements[0].type
    if keyword == "EXPLAIN":
        if stmt_type != duckdb.StatementType.EXPLAIN:
            raise SQLRefused("refused: malformed EXPLAIN")
        inner = _EXPLAIN.sub("", strip_leading(query), count=1)
        check_query(inner, root)
        return query
    if stmt_type != duckdb.StatementType.SELECT:
        raise SQLRefused(f"refused: {stmt_type.name} statements (read-only: {', '.join(ALLOWED_STARTS)})")
    tree = json.loads(_parser().execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):
        raise SQLRefused(
            f"refused: cannot verify this statement ({tree.get('error_message', 'parse error')})"
        )
    _walk(tree["statements"], root)
    return query


def allowed_root(con: duckdb.DuckDBPyConnection) -> str | None:
    """The run root of a hardened connection: its allowed directory other than DuckDB's temp dir."""
    dirs, temp = con.execute(
        "SELECT current_setting('allowed_directories'), current_setting('temp_directory')"
    ).fetchone()
    temp = os.path.abspath(temp) if temp else None
    roots = [str(d).rstrip("/") for d in dirs or [] if "://" in str(d) or os.path.abspath(str(d)) != temp]
    return roots[0] if len(roots) == 1 else None


def run_query(
    con: duckdb.DuckDBPyConnection, query: str, root: str | None = None, max_rows: int | None = None
) -> QueryResult:
    """Run one read-only statement on `con` (a storage.duck.connect connection) after check_query.

    `root` defaults to the connection's allowed directory (set by storage.duck.harden); without one, every
    file path is refused. DuckDB errors become SQLError (one line).
    """
    root = root or allowed_root(con) or "/nonexistent-run-root"
    check_query(query, root)
    try:
        cur = con.execute(query)
    except duckdb.Error as e:
        raise SQLError(" ".join(str(e).split("\n")[0].split())) from None
    columns = [d[0] for d in cur.description or []]
    rows = cur.fetchall() if max_rows is None else cur.fetchmany(max_rows)
    return QueryResult(columns, rows)
