"""`diffsae sql`: DuckDB views over a run (local and real S3), the read-only guard, the CLI and the
catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from storage import schemas
from storage.context import RunContext
from storage.duck import S3Settings, catalog_sql, connect, view_names
from storage.paths import RunPaths
from storage.sql_cli import main as sql_main
from storage.sql_guard import SQLError, SQLRefused, check_query, run_query
from storage.store import Store
from tests.synthetic import arrow_table

LATENT_SUM = (
    "SELECT latent_id, count(*) AS n, sum(kl_attribution) AS s FROM latent_tokens GROUP BY 1 ORDER BY 1"
)
EXPECTED_SUM = [(1, 3, 1.5), (2, 2, -1.0), (7, 1, 4.0)]


def write_run(store: str, run: str = "r") -> RunPaths:
    """Two latent_tokens parts and docs, with RunPaths' layout (no tokens/latents tables)."""
    paths = RunPaths(store, run)
    st = Store(paths.store_root)
    parts = [[(0, 1, 1, 1.0, 0.5), (0, 2, 1, 2.0, 0.5), (1, 1, 2, 1.0, -0.5)],
             [(1, 2, 1, 1.0, 0.5), (1, 3, 2, 1.0, -0.5), (2, 1, 7, 3.0, 4.0)]]  # fmt: skip
    for i, rows in enumerate(parts):
        table = pa.Table.from_pylist([dict(zip(schemas.LATENT_TOKENS.names, r)) for r in rows], schemas.LATENT_TOKENS)
        st.write_parquet(paths.latent_tokens_part(i), table)
    docs = arrow_table(schemas.DOCS, doc_id=[0, 1, 2], behaviour=["none", "x", "none"])
    st.write_parquet(paths.table("docs"), docs)
    return paths


@pytest.fixture
def run_paths(tmp_path) -> RunPaths:
    return write_run(str(tmp_path / "store"))


@pytest.fixture
def con(run_paths: RunPaths) -> duckdb.DuckDBPyConnection:
    return connect(RunContext.create(run_paths.store, run_paths.run))


def test_views_only_for_existing_tables(con: duckdb.DuckDBPyConnection) -> None:
    assert view_names(con) == ["docs", "latent_tokens"]
    assert [tuple(r) for r in con.execute(LATENT_SUM).fetchall()] == EXPECTED_SUM
    for name, schema in (("docs", schemas.DOCS), ("latent_tokens", schemas.LATENT_TOKENS)):  # the stored types
        assert con.execute(f"SELECT * FROM {name}").to_arrow_table().schema == schema, name


@pytest.mark.parametrize(
    "query",
    [
        LATENT_SUM,
        "WITH t AS (SELECT * FROM docs) SELECT count(*) FROM t",
        "DESCRIBE latent_tokens",
        "SHOW TABLES",
        "EXPLAIN SELECT * FROM docs",
        "EXPLAIN ANALYZE SELECT count(*) FROM latent_tokens",
        "FROM docs",
        "  -- a comment\n(SELECT 1 AS one)",
        "SELECT count(*) FROM read_parquet('{root}/analysis/latent_tokens/*.parquet')",
        "SELECT count(*) FROM '{root}/analysis/docs.parquet'",
        "SELECT * FROM glob('{root}/analysis/*')",
    ],
)
def test_allowed_queries(con: duckdb.DuckDBPyConnection, run_paths: RunPaths, query: str) -> None:
    res = run_query(con, query.format(root=run_paths.root))
    assert res.columns and res.rows


REFUSED = [
    ("COPY docs TO '{root}/out.csv'", "COPY"),
    ("ATTACH '{root}/x.duckdb' AS x", "ATTACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("PRAGMA version", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("RESET threads", "RESET"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("INSERT INTO docs VALUES (9, 'x')", "INSERT"),
    ("UPDATE docs SET behaviour = 'y'", "UPDATE"),
    ("DELETE FROM docs", "DELETE"),
    ("EXPORT DATABASE '{root}/exp'", "EXPORT"),
    ("CALL pragma_version()", "CALL"),
    ("/* hidden */ SET enable_external_access = true", "SET"),
    ("SELECT 1; SELECT 2", "one statement per query"),
    ("SELECT 1; COPY docs TO '/tmp/x.csv'", "one statement per query"),
    ("EXPLAIN COPY docs TO '{root}/x.csv'", "COPY"),
    ("SELECT * FROM read_parquet('/etc/passwd')", "outside the run root"),
    ("SELECT * FROM read_csv('{store}/other.csv')", "outside the run root"),
    ("SELECT * FROM read_csv_auto('{root}/../r2/x.csv')", "outside the run root"),
    ("SELECT * FROM read_text('/etc/hostname')", "outside the run root"),
    ("SELECT * FROM read_blob('/etc/passwd')", "outside the run root"),
    ("SELECT * FROM read_json('/etc/x.json')", "outside the run root"),
    ("SELECT * FROM parquet_scan('/tmp/*.parquet')", "outside the run root"),
    ("SELECT * FROM glob('/')", "outside the run root"),
    ("SELECT * FROM '/etc/passwd'", "outside the run root"),
    (
        "SELECT * FROM read_parquet(['{root}/analysis/docs.parquet', '/etc/x.parquet'])",
        "outside the run root",
    ),
    ("SELECT * FROM read_text(concat('/etc', '/passwd'))", "string-literal paths"),
    ("SELECT (SELECT count(*) FROM read_text('/etc/passwd'))", "outside the run root"),
    ("WITH x AS (SELECT * FROM read_text('/etc/passwd')) SELECT * FROM x", "outside the run root"),
    ("SELECT * FROM docs, sniff_csv('/etc/passwd')", "outside the run root"),
    ("DESCRIBE SELECT * FROM read_text('/etc/passwd')", "outside the run root"),
    ("EXPLAIN ANALYZE SELECT * FROM read_text('/etc/passwd')", "outside the run root"),
    ("SELECT * FROM query('SELECT 1')", "query() is not allowed"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets() is not allowed"),
    ("", "empty query"),
]


@pytest.mark.parametrize("query,reason", REFUSED)
def test_refused_queries(
    con: duckdb.DuckDBPyConnection, run_paths: RunPaths, query: str, reason: str
) -> None:
    q = query.format(root=run_paths.root, store=run_paths.store_root)
    with pytest.raises(SQLRefused) as e:
        run_query(con, q)
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not os.path.exists(os.path.join(run_paths.root, "out.csv"))


def test_connection_itself_is_hardened(con: duckdb.DuckDBPyConnection) -> None:
    """Even bypassing the guard, DuckDB refuses files outside the run root and configuration changes."""
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_text('/etc/hostname')")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error):
        con.execute("LOAD httpfs")
    assert [tuple(r) for r in con.execute(LATENT_SUM).fetchall()] == EXPECTED_SUM  # the views still work


def test_guard_checks_paths_without_a_connection(tmp_path) -> None:
    root = str(tmp_path / "runs" / "r")
    assert check_query(f"SELECT * FROM read_parquet('{root}/a.parquet')", root)
    with pytest.raises(SQLRefused):
        check_query(f"SELECT * FROM read_parquet('{root}-other/a.parquet')", root)
    with pytest.raises(SQLRefused):
        check_query("SELECT * FROM read_parquet('s3://b/p/runs/r/../../x.parquet')", "s3://b/p/runs/r")


def test_execution_errors_are_sql_errors(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(SQLError, match="^Catalog Error: Table with name nope does not exist") as e:
        run_query(con, "SELECT * FROM nope")
    assert "\n" not in str(e.value)


# -- CLI


def test_cli_formats(run_paths: RunPaths, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sql", LATENT_SUM, "--store", run_paths.store, "--run", run_paths.run]
    assert sql_main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["latent_id", "n", "s"] and set(lines[1]) <= {"-", " "}
    assert [line.split() for line in lines[2:5]] == [["1", "3", "1.5"], ["2", "2", "-1"], ["7", "1", "4"]]
    assert lines[5] == "(3 rows)"
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned columns
    assert sql_main(base + ["--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["latent_id,n,s", "1,3,1.5", "2,2,-1.0", "7,1,4.0"]
    assert sql_main(base + ["--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"latent_id": 1, "n": 3, "s": 1.5},
        {"latent_id": 2, "n": 2, "s": -1.0},
        {"latent_id": 7, "n": 1, "s": 4.0},
    ]  # fmt: skip


def test_cli_config_file(run_paths: RunPaths, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"store: {run_paths.store}\nrun: {run_paths.run}\n")
    assert sql_main(["sql", "SELECT count(*) AS n FROM docs", "--config", str(cfg), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n3\n"


def test_cli_subprocess_refusal_is_one_line_exit_2(run_paths: RunPaths) -> None:
    cmd = [sys.executable, "-m", "storage.sql_cli", "sql", "COPY docs TO '/tmp/x.csv'"]
    cmd += ["--store", run_paths.store, "--run", run_paths.run]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("diffsae sql: refused: COPY")
    ok = subprocess.run(
        cmd[:4] + ["SHOW TABLES"] + cmd[5:], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert ok.returncode == 0 and "latent_tokens" in ok.stdout


def test_cli_catalog_opens_in_fresh_connection(
    run_paths: RunPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sql_main(["sql", "--catalog", "--store", run_paths.store, "--run", run_paths.run]) == 0
    script = capsys.readouterr().out
    assert "CREATE OR REPLACE VIEW latent_tokens" in script and "VIEW latents " not in script
    fresh = duckdb.connect()
    fresh.execute(script)
    assert [tuple(r) for r in fresh.execute(LATENT_SUM).fetchall()] == EXPECTED_SUM


def test_cli_errors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sql_main(["sql", "SELECT 1", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("diffsae sql: config file not found")
    assert sql_main(["sql", "--store", str(tmp_path)]) == 2
    assert "give a query" in capsys.readouterr().err


# -- real S3 (SeaweedFS)


def test_same_select_over_real_s3(s3_store: str, run_paths: RunPaths, tmp_path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    )
    s3_paths = RunPaths(s3_store, "r")
    for name in ("latent_tokens", "docs"):  # upload the local run's files
        for local in sorted(Store(run_paths.store_root).fs.glob(run_paths.table(name))):
            fs.put(local, s3_paths.root[len("s3://") :] + local[len(run_paths.root) :])
    con = connect(RunContext.create(s3_store, "r"))
    assert view_names(con) == ["docs", "latent_tokens"]
    local = connect(RunContext.create(run_paths.store, "r"))
    assert run_query(con, LATENT_SUM).rows == run_query(local, LATENT_SUM).rows
    assert run_query(con, f"SELECT count(*) FROM '{s3_paths.table('docs')}'").rows == [(3,)]
    bucket = s3_store[len("s3://") :].split("/")[0]
    fs.put(run_paths.table("docs"), f"{bucket}/secret/docs.parquet")
    with pytest.raises(SQLRefused, match="outside the run root"):
        run_query(con, f"SELECT * FROM read_parquet('s3://{bucket}/secret/docs.parquet')")
    with pytest.raises(duckdb.PermissionException):  # the engine refuses too
        con.execute(f"SELECT * FROM read_parquet('s3://{bucket}/secret/docs.parquet')")
    # the catalog, credentials through DuckDB variables (getenv exists only in the DuckDB CLI)
    script = catalog_sql(RunContext.create(s3_store, "r"), S3Settings.from_env(), cli_env=False)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in script and "getenv('AWS_ACCESS_KEY_ID')" in script
    fresh = duckdb.connect()
    fresh.execute("SET VARIABLE diffsae_key_id = ?", [os.environ["AWS_ACCESS_KEY_ID"]])
    fresh.execute("SET VARIABLE diffsae_secret = ?", [os.environ["AWS_SECRET_ACCESS_KEY"]])
    fresh.execute(script)
    assert [tuple(r) for r in fresh.execute(LATENT_SUM).fetchall()] == EXPECTED_SUM
