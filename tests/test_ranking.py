"""Latent scores, ranks and recovery (storage/ranking.py + storage/sql/*.sql) on hand-computed tiny runs."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from diffsae.attribution import latent_doc_stats
from storage import schemas
from storage.context import RunContext
from storage.duck import connect
from storage.paths import RunPaths
from storage.ranking import DOMINANT_COLUMNS, SCORES, RankParams, rank_latents, resolve_score
from storage.recovery import BASELINES, format_recovery, recovery
from storage.store import Store
from tests.synthetic import arrow_table

# docs 0..7: 2, 3 are 'alpha', 4 is 'beta', the others ordinary.
LABELS = ["none", "none", "alpha", "alpha", "beta", "none", "none", None]
# (latent_id, doc_id, activation, kl_attribution), one row per firing token.
BASE_ROWS = [
    # latent 5: two tokens in the beta doc -> total 4.0, per-doc 4.0
    (5, 4, 1.0, 2.0), (5, 4, 3.0, 2.0),
    # latent 10: broad, one token in 7 documents, 0.5 each
    *[(10, d, 1.0, 0.5) for d in (0, 1, 2, 3, 5, 6, 7)],
    # latent 20: alpha (S_2 = 2.5, S_3 = 0.5) and a net-negative ordinary doc (S_0 = -0.25)
    (20, 2, 2.0, 1.0), (20, 2, 4.0, 1.5), (20, 3, 1.0, 0.5), (20, 0, 1.0, 0.25), (20, 0, 2.0, -0.5),
    # latent 30: one beta spike
    (30, 4, 8.0, 4.0),
    # latent 40: net negative (S_1 = -5.0) with a tiny positive doc (S_6 = 0.1)
    *[(40, 1, 0.5, -1.0)] * 5, (40, 6, 0.5, 0.1),
]  # fmt: skip
N_TOKENS = 40


def write_run(
    store: str,
    rows: list[tuple],
    labels: list[str | None],
    n_tokens: int,
    run: str = "r",
    latent_docs: bool = False,
) -> RunPaths:
    """Write latent_tokens (two parts), docs and tokens of a run with RunPaths' layout; with `latent_docs`, also
    the per-(latent, document) table as the attribution stage writes it (else ranking rebuilds it in SQL)."""
    paths = RunPaths(store, run)
    st = Store(paths.store_root)
    if latent_docs:
        doc, lat, act, attr = (np.array([r[i] for r in rows]) for i in (1, 0, 2, 3))
        stats = latent_doc_stats(doc, lat, act.astype(np.float32), attr.astype(np.float32))  # as stored
        st.write_parquet(paths.latent_docs_part(0), pa.table(stats._asdict(), schema=schemas.LATENT_DOCS))
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        lat_tokens = arrow_table(
            schemas.LATENT_TOKENS,
            doc_id=[r[1] for r in part],
            pos=range(len(part)),
            latent_id=[r[0] for r in part],
            activation=[r[2] for r in part],
            kl_attribution=[r[3] for r in part],
        )
        st.write_parquet(paths.latent_tokens_part(i), lat_tokens)
    st.write_parquet(paths.table("docs"), arrow_table(schemas.DOCS, doc_id=range(len(labels)), behaviour=labels))
    tokens = arrow_table(schemas.ANALYSIS_TOKENS, doc_id=[0] * n_tokens, pos=range(n_tokens))
    st.write_parquet(paths.table("tokens"), tokens)
    return paths


@pytest.fixture(params=["latent_docs", "tokens_only"])
def base_run(any_store: str, request: pytest.FixtureRequest) -> RunPaths:
    """The hand-computed run, on a local folder and on the real S3 server (conftest.any_store), with the
    latent_docs table the attribution stage writes and without it (older runs: rebuilt in SQL)."""
    return write_run(any_store, BASE_ROWS, LABELS, N_TOKENS, latent_docs=request.param == "latent_docs")


def by_id(table: pa.Table) -> dict[int, dict]:
    return {r["latent_id"]: r for r in table.to_pylist()}


FOCUS_20 = math.exp((2.5 * math.log(2.5) + 0.5 * math.log(0.5)) / 3.0)
EXPECTED = {  # hand-computed, see BASE_ROWS
    5: dict(n_active=2, n_docs=1, mean_activation=2.0, max_activation=3.0, kl_attr_sum=4.0, kl_attr_max=2.0,
            score_mean=None, score_peak_doc=4.0, score_concentration=4.0, score_top_docs=4 / 3,
            score_focus=4.0),
    10: dict(n_active=7, n_docs=7, mean_activation=1.0, max_activation=1.0, kl_attr_sum=3.5, kl_attr_max=0.5,
             score_mean=0.5, score_peak_doc=0.5, score_concentration=2.5**2 / 3.5, score_top_docs=0.5,
             score_focus=0.5),
    20: dict(n_active=5, n_docs=3, mean_activation=2.0, max_activation=4.0, kl_attr_sum=2.75, kl_attr_max=1.5,
             score_mean=0.55, score_peak_doc=2.5, score_concentration=3.0, score_top_docs=3.0 / 3,
             score_focus=FOCUS_20),
    30: dict(n_active=1, n_docs=1, mean_activation=8.0, max_activation=8.0, kl_attr_sum=4.0, kl_attr_max=4.0,
             score_mean=None, score_peak_doc=4.0, score_concentration=4.0, score_top_docs=4 / 3,
             score_focus=4.0),
    40: dict(n_active=6, n_docs=2, mean_activation=0.5, max_activation=0.5, kl_attr_sum=-4.9, kl_attr_max=0.1,
             score_mean=-4.9 / 6, score_peak_doc=0.1, score_concentration=0.1, score_top_docs=0.1 / 3,
             score_focus=0.1),
}  # fmt: skip
POS_MASS = {5: 4.0, 10: 3.5, 20: 3.0, 30: 4.0, 40: 0.1}  # sum of max(S_d, 0)
# Best first; ties broken by the smaller latent_id, NULL scores last.
EXPECTED_ORDER = {
    "total": [5, 30, 10, 20, 40],  # 4.0, 4.0, 3.5, 2.75, -4.9
    "mean": [20, 10, 40, 5, 30],  # 0.55, 0.5, -0.82, NULL, NULL
    "peak_token": [30, 5, 20, 10, 40],  # 4, 2, 1.5, 0.5, 0.1
    "peak_doc": [5, 30, 20, 10, 40],  # 4, 4, 2.5, 0.5, 0.1
    "concentration": [5, 30, 20, 10, 40],  # 4, 4, 3, 1.79, 0.1
    "top_docs": [5, 30, 20, 10, 40],  # 1.33, 1.33, 1.0, 0.5, 0.03 (positive parts)
    "focus": [5, 30, 20, 10, 40],  # 4, 4, 1.91, 0.5, 0.1
    # Σ 1/(60 + rank) over mean, peak_token, concentration: 5 (4,2,1) 0.048147 just above 20 (1,3,3) 0.048139
    "fusion": [5, 20, 30, 10, 40],
}
# (rank_mean, rank_peak_token, rank_concentration) per latent, read off the orders above
FUSED_FROM = {5: (4, 2, 1), 10: (2, 4, 4), 20: (1, 3, 3), 30: (5, 1, 2), 40: (3, 5, 5)}


def test_statistics_and_scores_by_hand(base_run: RunPaths) -> None:
    table = rank_latents(connect(RunContext.create(base_run.store, base_run.run)), "total")
    got = by_id(table)
    assert sorted(got) == sorted(EXPECTED)
    for lid, exp in EXPECTED.items():
        row = got[lid]
        assert row["frequency"] == pytest.approx(exp["n_active"] / N_TOKENS)
        assert row["kl_attr_mean"] == pytest.approx(exp["kl_attr_sum"] / exp["n_active"], rel=1e-6)
        assert row["score_total"] == pytest.approx(exp["kl_attr_sum"], rel=1e-6)
        assert row["score_peak_token"] == pytest.approx(exp["kl_attr_max"], rel=1e-6)
        assert row["pos_mass"] == pytest.approx(POS_MASS[lid], rel=1e-6)
        for key, value in exp.items():
            if value is None:
                assert row[key] is None, (lid, key)
            else:
                assert row[key] == pytest.approx(value, rel=1e-6), (lid, key, row[key])


def test_fusion_score_by_hand(base_run: RunPaths) -> None:
    """score_fusion is the reciprocal rank fusion of three ranks; a different offset can change the order."""
    con = connect(RunContext.create(base_run.store, base_run.run))
    got = by_id(rank_latents(con, "fusion"))
    for lid, ranks in FUSED_FROM.items():
        assert got[lid]["score_fusion"] == pytest.approx(sum(1 / (60 + r) for r in ranks), rel=1e-12), lid
    # offset 0: 5 -> 1/4 + 1/2 + 1 = 1.75, 30 -> 1/5 + 1 + 1/2 = 1.7, 20 -> 1 + 1/3 + 1/3 = 1.67, 10 -> 1.0, 40 -> 0.73
    small = by_id(rank_latents(con, "fusion", params=RankParams(rrf_k=0)))
    assert [lid for lid in sorted(small, key=lambda i: small[i]["rank"])] == [5, 30, 20, 10, 40]
    assert small[30]["score_fusion"] == pytest.approx(1.7)


def test_every_score_ranks_by_hand(base_run: RunPaths) -> None:
    table = rank_latents(connect(RunContext.create(base_run.store, base_run.run)), "total")
    got = by_id(table)
    assert set(EXPECTED_ORDER) == set(SCORES)
    for score, order in EXPECTED_ORDER.items():
        assert [got[lid][f"rank_{score}"] for lid in order] == [1, 2, 3, 4, 5], score
    assert table.column("latent_id").to_pylist() == EXPECTED_ORDER["total"]  # sorted by rank


@pytest.mark.parametrize("rank_by", ["mean", "peak_token", "focus", "score_top_docs", "kl_attr_sum"])
def test_rank_by_switches_rank(base_run: RunPaths, rank_by: str) -> None:
    score = resolve_score(rank_by)
    table = rank_latents(connect(RunContext.create(base_run.store, base_run.run)), rank_by)
    assert table.column("latent_id").to_pylist() == EXPECTED_ORDER[score]
    assert table.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("rank").equals(table.column(f"rank_{score}"))


def test_unknown_rank_by_is_one_line(base_run: RunPaths) -> None:
    with pytest.raises(
        ValueError, match=r"unknown rank_by 'loudness': choose one of total, mean, peak_token"
    ) as e:
        rank_latents(connect(RunContext.create(base_run.store, base_run.run)), "loudness")
    assert "\n" not in str(e.value)


def test_dominant_behaviour_and_latent_dirs(base_run: RunPaths) -> None:
    dirs = arrow_table(
        schemas.LATENT_DIRS, latent_id=[20, 30], promoted=[["alpha", "a2"], ["beta"]], suppressed=[["x"], []]
    )
    got = by_id(rank_latents(connect(RunContext.create(base_run.store, base_run.run)), "focus", latent_dirs=dirs))
    assert (got[20]["dominant_behaviour"], got[20]["dominant_share"]) == ("alpha", pytest.approx(1.0))
    assert (got[30]["dominant_behaviour"], got[30]["dominant_share"]) == ("beta", pytest.approx(1.0))
    assert got[10]["dominant_behaviour"] == "none"  # 5 ordinary docs (one unlabelled) of 7
    assert got[10]["dominant_share"] == pytest.approx(2.5 / 3.5)
    assert got[20]["promoted"] == ["alpha", "a2"] and got[30]["suppressed"] == []
    assert got[10]["promoted"] is None


def test_no_planted_labels_no_dominant_columns(tmp_path) -> None:
    paths = write_run(str(tmp_path / "s"), BASE_ROWS, ["none"] * 8, N_TOKENS)
    con = connect(RunContext.create(paths.store, paths.run))
    table = rank_latents(con)
    assert "dominant_behaviour" not in table.column_names and "dominant_share" not in table.column_names
    want = schemas.latents_schema(SCORES)
    assert table.schema == pa.schema([f for f in want if f.name not in DOMINANT_COLUMNS])
    assert recovery(con, table).num_rows == 0
    assert "no planted" in format_recovery(recovery(con, table))


@pytest.mark.parametrize("with_dirs", [False, True])
def test_latents_output_has_the_storage_schema(base_run: RunPaths, with_dirs: bool) -> None:
    """The latents table rank_latents.sql produces is exactly storage/schemas.py's latents_schema(SCORES): names,
    order and types (with the latent_docs table and rebuilt from latent_tokens, on local and S3 stores)."""
    dirs = arrow_table(schemas.LATENT_DIRS, latent_id=[20], promoted=[["a"]], suppressed=[[]]) if with_dirs else None
    con = connect(RunContext.create(base_run.store, base_run.run))
    table = rank_latents(con, "focus", latent_dirs=dirs)
    assert table.schema == schemas.latents_schema(SCORES)
    assert recovery(con, table).schema == schemas.RECOVERY


def test_min_support_param(base_run: RunPaths) -> None:
    con = connect(RunContext.create(base_run.store, base_run.run))
    got = by_id(rank_latents(con, params=RankParams(min_support=2)))
    assert got[5]["score_mean"] == pytest.approx(2.0) and got[30]["score_mean"] is None


def recovery_rows() -> tuple[list[tuple], list[str | None]]:
    """BASE_ROWS plus doc 8 'gamma' (latent 60: share 0.75, not captured), doc 9 'delta' (latent 70: 0.8,
    captured)."""
    rows = BASE_ROWS + [(60, 8, 1.0, 0.75), (60, 7, 1.0, 0.25), (70, 9, 1.0, 2.0), (70, 5, 1.0, 0.5)]
    return rows, LABELS + ["gamma", "delta"]


@pytest.mark.parametrize("latent_docs", [True, False])
def test_recovery_by_hand(tmp_path, latent_docs: bool) -> None:
    rows, labels = recovery_rows()
    paths = write_run(str(tmp_path / "s"), rows, labels, N_TOKENS, latent_docs=latent_docs)
    con = connect(RunContext.create(paths.store, paths.run))
    latents = rank_latents(con, "total")
    # total: 5 (4.0), 30 (4.0), 10 (3.5), 20 (2.75), 70 (2.5), 60 (1.0), 40 (-4.9)
    assert latents.column("latent_id").to_pylist() == [5, 30, 10, 20, 70, 60, 40]
    rec = recovery(con, latents)
    assert rec.schema == schemas.RECOVERY
    assert rec.num_rows == (len(SCORES) + len(BASELINES)) * 4
    table = {(r["score"], r["behaviour"]): r for r in rec.to_pylist()}
    assert table[("total", "alpha")]["best_rank"] == 4  # latent 20
    assert table[("total", "beta")]["best_rank"] == 1  # latent 5 (and 30)
    assert table[("total", "delta")]["best_rank"] == 5  # latent 70: exactly 80 % counts
    assert table[("total", "gamma")]["best_rank"] is None  # latent 60: 75 % is not a capture
    assert [table[("total", b)]["recovered"] for b in ("alpha", "beta", "delta", "gamma")] == [True] * 3 + [
        False
    ]
    # captures: 5, 30 (beta), 20 (alpha), 70 (delta) -> 4 of the 7 latents in the top 10
    assert table[("total", "gamma")]["top10_capture_fraction"] == pytest.approx(4 / 7)
    # mean (min support 5): 20 (0.55), 10 (0.5), 40 (-0.82), then NULLs by id: 5, 30, 60, 70
    assert table[("mean", "delta")]["best_rank"] == 7 and table[("mean", "alpha")]["best_rank"] == 1
    # a smaller top_k: recovered and the fraction follow it
    rec3 = {(r["score"], r["behaviour"]): r for r in recovery(con, latents, top_k=3).to_pylist()}
    assert rec3[("total", "alpha")]["recovered"] is False and rec3[("total", "beta")]["recovered"] is True
    assert rec3[("total", "beta")]["top10_capture_fraction"] == pytest.approx(2 / 3)  # 5, 30 of 5, 30, 10
    text = format_recovery(rec)
    assert text.splitlines()[1].split() == ["score", "top10_capture", "alpha", "beta", "delta", "gamma"]
    assert text.splitlines()[2].split() == ["total", "0.57", "4", "*", "1", "*", "5", "*", "-"]


def test_recovery_uses_latents_view_when_written(tmp_path) -> None:
    rows, labels = recovery_rows()
    paths = write_run(str(tmp_path / "s"), rows, labels, N_TOKENS)
    latents = rank_latents(connect(RunContext.create(paths.store, paths.run)), "focus")
    Store(paths.store_root).write_parquet(paths.table("latents"), latents)
    con = connect(RunContext.create(paths.store, paths.run))  # now with a `latents` view
    assert recovery(con).equals(recovery(con, latents))


def test_rare_planted_latents_beat_broad_drift_except_under_total(tmp_path) -> None:
    """Issue 9: 20 broad latents (100 ordinary docs, 0.05 per token, 3 tokens a doc: total 15) and 3 planted
    latents (5 labelled docs each, 2 tokens of 0.5: total 5). Total attribution buries the planted ones; the
    document-level scores put them on top."""
    rows: list[tuple] = []
    labels: list[str | None] = ["none"] * 100
    for b in range(3):
        docs = list(range(len(labels), len(labels) + 5))
        labels += [f"planted{b}"] * 5
        rows += [(1000 + b, d, 2.0, 0.5) for d in docs for _ in range(2)]
    rows += [(lid, d, 1.0, 0.05) for lid in range(20) for d in range(100) for _ in range(3)]
    paths = write_run(str(tmp_path / "s"), rows, labels, 1000, latent_docs=True)
    con = connect(RunContext.create(paths.store, paths.run))
    rec = {(r["score"], r["behaviour"]): r for r in recovery(con, rank_latents(con)).to_pylist()}
    for b in range(3):
        assert (
            rec[("total", f"planted{b}")]["best_rank"] > 20 and not rec[("total", f"planted{b}")]["recovered"]
        )
        for score in ("mean", "peak_token", "peak_doc", "concentration", "top_docs", "focus"):
            assert rec[(score, f"planted{b}")]["best_rank"] <= 3, score
    assert rec[("total", "planted0")]["top10_capture_fraction"] == 0.0
    assert rec[("focus", "planted0")]["top10_capture_fraction"] == pytest.approx(3 / 10)


def test_latent_doc_stats_by_hand() -> None:
    """The attribution stage's per-(latent, document) aggregation, against the rows of BASE_ROWS."""
    doc, lat, act, attr = (np.array([r[i] for r in BASE_ROWS]) for i in (1, 0, 2, 3))
    s = latent_doc_stats(doc, lat, act.astype(np.float32), attr.astype(np.float32))
    got = {(int(a), int(d)): tuple(float(v) for v in rest) for a, d, *rest in zip(*s)}
    assert list(got)[:3] == [(5, 4), (10, 0), (10, 1)]  # sorted by latent, then document
    assert got[(5, 4)] == (2, 4.0, 3.0, 4.0, 2.0)
    assert got[(20, 0)] == (2, 3.0, 2.0, -0.25, 0.25)
    assert got[(40, 1)] == (5, 2.5, 0.5, -5.0, -1.0)
    assert len(got) == len({(r[0], r[1]) for r in BASE_ROWS})
    empty = latent_doc_stats(*(np.zeros(0, t) for t in (np.int64, np.int32, np.float32, np.float32)))
    assert all(len(c) == 0 for c in empty) and empty.attr_sum.dtype == np.float64


def test_ranking_equal_with_and_without_latent_docs(tmp_path) -> None:
    """The precomputed table and the SQL rebuild from latent_tokens give the same latents and recovery."""
    rng = np.random.default_rng(0)
    rows = [(int(rng.integers(0, 30)), int(d), float(rng.random()), float(rng.normal(0.01, 0.1)))
            for d in range(40) for _ in range(int(rng.integers(1, 60)))]  # fmt: skip
    labels = ["none"] * 30 + ["alpha"] * 5 + ["beta"] * 5
    out = []
    for flag in (True, False):
        paths = write_run(str(tmp_path / str(flag)), rows, labels, 2000, latent_docs=flag)
        con = connect(RunContext.create(paths.store, paths.run))
        latents = rank_latents(con, "focus")
        out.append((latents, recovery(con, latents)))
    (a, ra), (b, rb) = out
    assert a.column_names == b.column_names and ra.equals(rb)
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name.startswith(("score_", "kl_", "mean_", "pos_", "dominant_share", "frequency")):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12, nan_ok=True), name
        else:
            assert x == y, name


def test_sql_fingerprint_follows_the_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank stage's cache key includes the SQL: editing a score's definition reranks (flows/stages.py)."""
    import shutil

    import storage.ranking as ranking

    sql_dir = tmp_path / "sql"
    shutil.copytree(ranking.SQL_DIR, sql_dir)
    monkeypatch.setattr(ranking, "SQL_DIR", sql_dir)
    before = ranking.sql_fingerprint()
    assert before == ranking.sql_fingerprint()
    (sql_dir / "rank_latents.sql").write_text((sql_dir / "rank_latents.sql").read_text() + "\n-- edited\n")
    assert ranking.sql_fingerprint() != before
