"""Cost of the latent ranking SQL (all scores) against a bare scan of the same Parquet columns.

What: writes N synthetic `latent_tokens` rows (default 10 M in 50 Parquet files, RunPaths layout in a temp
store): doc_id int64, pos int32, latent_id int32 over 16 384 latents, activation float32, kl_attribution
float32; documents of 256 tokens x 32 active latents (~1 220 documents), each document drawing its latents from
its own `--doc-latents` K-latent subset (default 2048: ~0.25 distinct (latent, document) pairs per row, the
ratio measured on the demo run, 896 k rows -> 216 k pairs; 0 = uniform, ~0.79 pairs per row, the worst case);
plus a docs table with 2 % of the documents labelled with one of two planted behaviours. It also writes the
`latent_docs` table as the attribution stage does (diffsae.attribution.latent_doc_stats per batch of whole
documents) and reports that aggregation's time: the cost moved into the attribution stage. On one
`storage.duck.connect` connection it times, best of `--repeat` after a warm-up:
  - bare scan: `SELECT count(*), sum(doc_id), sum(latent_id), sum(activation), sum(kl_attribution) FROM
    latent_tokens`: the same rows, the columns a ranking from scratch would read, decoded and aggregated once;
  - the (latent, document) aggregation in SQL (storage/sql/latent_docs.sql over latent_tokens);
  - ranking: `storage.ranking.rank_latents(con, "total")` over latent_docs: every score and rank, the dominant
    behaviour, the result as a pyarrow table (n_tokens passed in, as the pipeline knows it);
  - the same ranking for a run without latent_docs (rebuilt in SQL from latent_tokens), and whether both orders
    agree;
and prints the times and the ratio ranking / bare scan (target <= 3), then the recovery query's time. With the
run's `tokens` table (roles: the first 96 positions of a document are user/template tokens, the rest assistant), it
also times the product default: the ranking of assistant tokens only with the broad list (latent_tokens joined to
the scored tokens), the latent groups of its head (500), recovery v1 + v2 with the groups and baselines, and the
false alarms (5 placebo draws).

Why: ranking must stay a cheap post-processing step over the attribution output.

    python bench/rank.py                      # 10 M rows, demo-like (latent, document) pairs
    python bench/rank.py --doc-latents 0      # uniform latents: the worst case
    python bench/rank.py --doc-latents 512    # very topical documents
    python bench/rank.py --write              # also append the figures to docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Callable, NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffsae.attribution import latent_doc_stats
from storage.context import RunContext
from storage.duck import connect
from storage.groups import latent_groups
from storage.paths import RunPaths
from storage.ranking import RankParams, load_sql, rank_latents, render
from storage.recovery import false_alarms, recovery
from storage.schemas import LATENT_DOCS
from tasks.attribute import parts_table

BARE_SCAN = (
    "SELECT count(*), sum(doc_id), sum(latent_id), sum(activation), sum(kl_attribution) FROM latent_tokens"
)
TOKENS_PER_DOC, LATENTS_PER_TOKEN = 256, 32


class BenchResult(NamedTuple):
    rows: int
    files: int
    latents: int
    doc_latents: int | None
    pairs: int
    threads: int
    bare_s: float
    pairs_s: float
    rank_s: float
    rebuild_s: float
    recovery_s: float
    build_s: float
    same: bool
    roles_s: float  # ranking of the scored roles with the broad list (the product default)
    groups_s: float
    recovery_v2_s: float  # recovery v1 + v2 with groups and baselines, after roles
    false_alarms_s: float
    n_broad: int

    @property
    def ratio(self) -> float:
        return self.rank_s / self.bare_s


def write_data(
    paths: RunPaths, rows: int, files: int, n_latents: int, doc_latents: int | None, seed: int = 0
) -> tuple[int, float]:
    """The synthetic run; returns the number of analysed tokens and the seconds `latent_doc_stats` took to build
    the latent_docs table (what the attribution stage adds to write it). With `doc_latents`, each document draws
    its latents from its own random subset of that many latents (topical, like real SAE codes), else uniformly."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(paths.latent_tokens_part(0)), exist_ok=True)
    os.makedirs(os.path.dirname(paths.latent_docs_part(0)), exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    written: list[pa.Table] = []
    for i in range(files):
        idx = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
        token = idx // LATENTS_PER_TOKEN
        table = pa.table({
            "doc_id": token // TOKENS_PER_DOC,
            "pos": (token % TOKENS_PER_DOC).astype(np.int32),
            "latent_id": draw_latents(rng, token // TOKENS_PER_DOC, n_latents, doc_latents),
            "activation": np.abs(rng.standard_normal(len(idx), dtype=np.float32)),
            "kl_attribution": (0.01 * rng.standard_normal(len(idx)) + 0.002).astype(np.float32),
        })  # fmt: skip
        pq.write_table(table, paths.latent_tokens_part(i))
        written.append(table)
    build_s = write_latent_docs(paths, pa.concat_tables(written), files)
    n_tokens = -(-rows // LATENTS_PER_TOKEN)
    n_docs = -(-n_tokens // TOKENS_PER_DOC)
    labels = np.full(n_docs, "none", dtype=object)
    planted = rng.choice(n_docs, max(2, n_docs // 50), replace=False)
    labels[planted] = np.where(np.arange(len(planted)) % 2 == 0, "planted_a", "planted_b")
    docs = pa.table({"doc_id": np.arange(n_docs, dtype=np.int64), "behaviour": pa.array(labels, pa.string())})
    pq.write_table(docs, paths.table("docs"))
    tok = np.arange(n_tokens, dtype=np.int64)
    pos = (tok % TOKENS_PER_DOC).astype(np.int32)
    role = np.where(pos < 8, "template", np.where(pos < 96, "user", "assistant")).astype(object)
    tokens = pa.table({"doc_id": tok // TOKENS_PER_DOC, "pos": pos, "role": pa.array(role, pa.string()),
                       "kl": rng.exponential(0.1, n_tokens).astype(np.float32)})  # fmt: skip
    pq.write_table(tokens, paths.table("tokens"))
    return n_tokens, build_s


def write_latent_docs(paths: RunPaths, lt: pa.Table, files: int) -> float:
    """latent_docs as the attribution stage builds it (diffsae.attribution.latent_doc_stats, one call per batch of
    whole documents: here batches of ~8 documents); returns the seconds spent aggregating (not writing)."""
    doc = lt.column("doc_id").to_numpy()
    cols = {k: lt.column(k).to_numpy() for k in ("latent_id", "activation", "kl_attribution")}
    cuts = np.flatnonzero(np.diff(doc // 8)) + 1  # batch boundaries: 8 whole documents per batch
    stats, build_s = [], 0.0
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(doc)]):
        t0 = time.perf_counter()
        st = latent_doc_stats(doc[lo:hi], cols["latent_id"][lo:hi], cols["activation"][lo:hi],
                              cols["kl_attribution"][lo:hi])  # fmt: skip
        build_s += time.perf_counter() - t0
        stats.append(st)
    table = parts_table([st._asdict() for st in stats], LATENT_DOCS)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(np.int64)
    for i in range(files):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), paths.latent_docs_part(i))
    return build_s


def draw_latents(
    rng: np.random.Generator, doc: np.ndarray, n_latents: int, doc_latents: int | None
) -> np.ndarray:
    if doc_latents is None:
        return rng.integers(0, n_latents, len(doc), dtype=np.int32)
    # latent = (doc's random offset + a slot < doc_latents, times a stride coprime with n_latents) mod
    # n_latents
    offset = (doc * 2654435761) % n_latents
    slot = rng.integers(0, doc_latents, len(doc))
    return ((offset + slot * 7919) % n_latents).astype(np.int32)


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: file metadata, OS page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_bench(
    rows: int,
    files: int,
    n_latents: int,
    doc_latents: int | None,
    threads: int | None,
    repeat: int,
    keep: str | None,
) -> BenchResult:
    tmp = keep or tempfile.mkdtemp(prefix="diffsae-bench-rank-")
    paths = RunPaths(tmp, "bench")
    try:
        t0 = time.perf_counter()
        n_tokens, build_s = write_data(paths, rows, files, n_latents, doc_latents)
        print(
            f"wrote {rows:,} latent_tokens rows in {files} files under {paths.root} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        con = connect(RunContext.create(paths.store, paths.run), harden_connection=False)
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        used_threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        bare = best_of(lambda: con.execute(BARE_SCAN).fetchall(), repeat)
        latent_docs = render(load_sql("latent_docs.sql"), latent_tokens="latent_tokens", where="true")
        pairs_sql = f"SELECT count(*), sum(attr_sum) FROM ({latent_docs})"
        pairs = best_of(lambda: con.execute(pairs_sql).fetchall(), repeat)
        n_pairs = con.execute(pairs_sql).fetchone()[0]
        assert n_pairs == con.execute("SELECT count(*) FROM latent_docs").fetchone()[0]
        latents: list[pa.Table] = []
        rank = best_of(lambda: latents.append(rank_latents(con, "total", n_tokens=n_tokens)), repeat)
        rec = best_of(lambda: recovery(con, latents[-1]), 1)
        assert "dominant_behaviour" in latents[-1].column_names
        params = RankParams(roles=("assistant", "text"), broad_docs=0.9)
        scored: list[pa.Table] = []
        roles_s = best_of(lambda: scored.append(rank_latents(con, "mean", params=params)), repeat)
        groups: list[pa.Table] = []
        groups_s = best_of(lambda: groups.append(latent_groups(con, scored[-1], roles=params.roles)), 1)
        rec2 = best_of(lambda: recovery(con, scored[-1], roles=params.roles, groups=groups[-1]), 1)
        fa = best_of(lambda: false_alarms(con, scored[-1], roles=params.roles, groups=groups[-1]), 1)
        n_broad = len(scored[-1].column("rank_broad").drop_null())
        con.execute("DROP VIEW latent_docs")  # a run without the table: ranking rebuilds it from latent_tokens
        rebuilt: list[pa.Table] = []
        rebuild = best_of(lambda: rebuilt.append(rank_latents(con, "total", n_tokens=n_tokens)), repeat)
        same = latents[-1].column("latent_id").equals(rebuilt[-1].column("latent_id"))
        return BenchResult(
            rows, files, n_latents, doc_latents, n_pairs, int(used_threads), bare, pairs, rank, rebuild, rec,
            build_s, same, roles_s, groups_s, rec2, fa, n_broad,
        )  # fmt: skip
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def report(r: BenchResult) -> str:
    return "\n".join([
        f"- {r.rows:,} rows, {r.files} files, {r.latents:,} latents "
        f"({'uniform' if r.doc_latents is None else f'{r.doc_latents} per document'}), "
        f"{r.pairs:,} (latent, document) pairs; DuckDB {duckdb.__version__}, {r.threads} threads, "
        f"{platform.machine()} ({os.cpu_count()} CPUs visible)",
        f"- bare scan (count + 4 sums of the ranked columns): {r.bare_s:.3f} s",
        f"- (latent, document) aggregation alone (latent_docs.sql, the floor of any document-level score): "
        f"{r.pairs_s:.3f} s = {r.pairs_s / r.bare_s:.2f}x the bare scan",
        f"- latent_docs built by the attribution stage (latent_doc_stats, batches of 8 documents): {r.build_s:.3f} s",
        f"- ranking from latent_docs (all 7 scores, ranks, dominant behaviour): {r.rank_s:.3f} s",
        f"- ratio ranking / bare scan: {r.ratio:.2f}x (target <= 3x)",
        f"- ranking of a run without latent_docs (rebuilt in SQL from latent_tokens): {r.rebuild_s:.3f} s = "
        f"{r.rebuild_s / r.bare_s:.2f}x the bare scan; same order: {r.same}",
        f"- recovery (all scores x planted behaviours): {r.recovery_s:.3f} s",
        f"- product default: ranking of assistant tokens with the broad list (latent_tokens joined to the scored "
        f"tokens; {r.n_broad:,} broad): {r.roles_s:.3f} s = {r.roles_s / r.bare_s:.2f}x the bare scan; latent groups"
        f" of its head: {r.groups_s:.3f} s; recovery v1 + v2 with groups and baselines: {r.recovery_v2_s:.3f} s;"
        f" false alarms (5 draws): {r.false_alarms_s:.3f} s",
    ])  # fmt: skip


def append_benchmarks(text: str, path: str = "docs/BENCHMARKS.md") -> None:
    """Add a dated entry under '## Ranking (bench/rank.py)', creating the file or the section if absent."""
    head = "## Ranking (bench/rank.py)"
    args = " ".join(a for a in sys.argv[1:] if a != "--write")
    load = os.getloadavg()[0]
    entry = (
        f"\n{time.strftime('%Y-%m-%d')}, `python bench/rank.py {args}` (load average {load:.1f}):\n{text}\n"
    )
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if head not in old:
        old = old.rstrip("\n") + f"\n\n{head}\n"
    start = old.index(head) + len(head)
    nxt = old.find("\n## ", start)
    end = len(old) if nxt < 0 else nxt
    section = old[start:end].rstrip("\n") + "\n" + entry
    with open(path, "w") as f:
        f.write(old[:start] + section + old[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument(
        "--doc-latents", type=int, default=2048,
        help="latents per document (default 2048: ~0.25 (latent, document) pairs per row, as the demo run; 0: uniform)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: DuckDB's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--keep", default=None, help="write the data here and keep it (default: a temp dir, removed)"
    )
    ap.add_argument("--write", action="store_true", help="append the figures to docs/BENCHMARKS.md")
    args = ap.parse_args()
    result = run_bench(
        args.rows, args.files, args.latents, args.doc_latents or None, args.threads, args.repeat, args.keep
    )
    text = report(result)
    print(text)
    if args.write:
        append_benchmarks(text)


if __name__ == "__main__":
    main()
