"""Recovery v2 (precision and coverage on held-out documents) and its baselines, on a hand-built run: every
expected figure is computed by hand from the rows below (issue 15 parts 1-2)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from diffsae.config import SCORES, SAEConfig
from diffsae.split import heldout_docs, sae_splits
from storage import schemas
from storage.context import RunContext
from storage.duck import connect
from storage.paths import RunPaths
from storage.ranking import rank_latents
from storage.recovery import BASELINES, false_alarms, format_false_alarms, format_recovery, random_recovery, recovery
from storage.store import Store
from tests.synthetic import arrow_table

# docs 0..39 alpha, 40..49 beta, 50..59 ordinary; one token (pos 0) each, whose KL depends on the label
LABELS = ["alpha"] * 40 + ["beta"] * 10 + ["none"] * 10
KL = {"alpha": 0.5, "beta": 2.0, "none": 0.1}
ROWS = [  # (latent_id, doc_id, kl_attribution)
    (1, 0, 5.0),  # precision 1.0 but coverage 1/40: captures alpha under v1 only
    *[(2, d, 0.1) for d in range(20)],  # alpha, coverage exactly 20/40
    *[(3, d, 0.2) for d in range(40, 45)], (3, 50, 0.1), (3, 51, 0.1),  # beta: precision 1.0/1.2, coverage 5/10
    *[(4, d, 0.1) for d in range(40, 50)], *[(4, d, 0.05) for d in range(50, 56)],  # beta precision 1/1.3: no
    *[(5, d, 0.01) for d in range(50, 60)],  # ordinary only
    *[(6, d, 0.05) for d in range(20, 40)],  # alpha, but only in documents 20..39
]  # fmt: skip
# totals: 1 5.0, 2 2.0, 4 1.3, 3 1.2, 6 1.0, 5 0.1 -> rank_total 1..6 in that order
HELDOUT = [*range(10), *range(40, 45), *range(50, 60)]  # 10 alpha, 5 beta, 10 ordinary documents


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory):
    paths = RunPaths(str(tmp_path_factory.mktemp("s")), "r")
    st = Store(paths.store_root)
    lat, doc, attr = (np.array([r[i] for r in ROWS]) for i in range(3))
    st.write_parquet(
        paths.latent_tokens_part(0),
        arrow_table(schemas.LATENT_TOKENS, doc_id=doc, pos=np.zeros(len(ROWS)), latent_id=lat,
                    activation=np.ones(len(ROWS)), kl_attribution=attr),
    )  # fmt: skip
    n = len(LABELS)
    st.write_parquet(paths.table("docs"), arrow_table(schemas.DOCS, doc_id=range(n), behaviour=LABELS))
    st.write_parquet(
        paths.table("tokens"),
        arrow_table(schemas.ANALYSIS_TOKENS, doc_id=range(n), pos=[0] * n, role=["assistant"] * n,
                    kl=[KL[b] for b in LABELS]),
    )  # fmt: skip
    return connect(RunContext.create(paths.store, paths.run))


def table(rec: pa.Table) -> dict[tuple[str, str], dict]:
    return {(r["score"], r["behaviour"]): r for r in rec.to_pylist()}


def test_v2_on_every_document_by_hand(con) -> None:
    latents = rank_latents(con, "total")
    assert latents.column("latent_id").to_pylist() == [1, 2, 4, 3, 6, 5]
    rec = recovery(con, latents, top_k=2)
    assert rec.schema == schemas.RECOVERY
    assert rec.column("score").unique().to_pylist() == list(SCORES + BASELINES)
    t = table(rec)
    # v1 (precision only) counts latent 1 for alpha; v2 needs coverage: latent 2 (exactly 50 %) at rank 2
    assert t[("total", "alpha")]["best_rank"] == 1 and t[("total", "alpha")]["best_rank_v2"] == 2
    # beta: latent 3 (precision 0.83, coverage 0.5) at rank 4; latent 4 (precision 0.77) never counts
    assert t[("total", "beta")]["best_rank"] == 4 and t[("total", "beta")]["best_rank_v2"] == 4
    assert t[("total", "alpha")]["recovered_v2"] and not t[("total", "beta")]["recovered_v2"]
    assert [t[("total", b)]["n_capturing"] for b in ("alpha", "beta")] == [2, 1]  # {2, 6}, {3}
    assert [t[("total", b)]["n_heldout"] for b in ("alpha", "beta")] == [40, 10]
    # frequency: 2 (20), 6 (20), 4 (16), 5 (10), 3 (7), 1 (1)
    assert t[("frequency", "alpha")]["best_rank_v2"] == 1 and t[("frequency", "beta")]["best_rank_v2"] == 5
    # firing KL: 3 (10.2/7), 4 (20.6/16), then 1, 2, 6 at 0.5 (ties by id), 5 at 0.1
    assert t[("firing_kl", "alpha")]["best_rank_v2"] == 4 and t[("firing_kl", "beta")]["best_rank_v2"] == 1
    assert t[("frequency", "alpha")]["best_rank"] is None  # baselines have no v1
    # random over the 6 latents, top 2: 1 - C(4,2)/C(6,2) with 2 capturing, 1 - C(5,2)/C(6,2) with 1
    assert t[("random", "alpha")]["expected_v2"] == pytest.approx(1 - 6 / 15)
    assert t[("random", "beta")]["expected_v2"] == pytest.approx(1 - 10 / 15)
    assert t[("random", "alpha")]["recovered_v2"] is None


def test_v2_reads_only_heldout_documents(con) -> None:
    t = table(recovery(con, rank_latents(con, "total"), top_k=2, heldout=HELDOUT))
    # held out: alpha 0..9 (latent 2 fires in all; 1 in 1 of 10; 6 in none), beta 40..44 (latent 3 in all)
    assert [t[("total", b)]["n_heldout"] for b in ("alpha", "beta")] == [10, 5]
    assert [t[("total", b)]["n_capturing"] for b in ("alpha", "beta")] == [1, 1]
    assert t[("total", "alpha")]["best_rank_v2"] == 2 and t[("total", "beta")]["best_rank_v2"] == 4
    assert t[("random", "alpha")]["expected_v2"] == pytest.approx(1 - 10 / 15)
    text = format_recovery(recovery(con, rank_latents(con, "total"), heldout=HELDOUT))
    assert "held-out documents per behaviour: alpha 10, beta 5" in text
    v1, v2 = [line.split() for line in text.splitlines() if line.startswith("total ")]
    assert v1 == ["total", "0.67", "1", "*", "4", "*"]  # v1: every document, latent 1 counts
    assert v2 == ["total", "2/2", "2", "*", "4", "*"]


def test_random_recovery_closed_form() -> None:
    for n, m, k in [(10, 1, 1), (10, 3, 2), (50, 4, 10), (7, 0, 3), (5, 2, 5), (5, 5, 1)]:
        want = 0.0 if m == 0 else 1 - (math.comb(n - m, k) / math.comb(n, k) if k <= n else 0)
        assert random_recovery(n, m, k) == pytest.approx(want), (n, m, k)


def test_heldout_docs_never_trained_on() -> None:
    cfg = SAEConfig(val_fraction=0.1, calibration_fraction=0.1, seed=5)
    parts = sae_splits(300, cfg)
    held = heldout_docs(300, cfg)
    assert not set(held) & set(parts["fit"])
    assert set(held) | set(parts["fit"]) == set(range(300))
    assert set(held) == set(parts["validation"]) | set(parts["calibration"])
    assert len(held) > 0 and np.array_equal(held, heldout_docs(300, cfg))


def test_false_alarms_by_hand(con) -> None:
    latents = rank_latents(con, "total")
    # one placebo label holding all 10 ordinary documents: latent 5 (ordinary only, all 10) passes precision 1.0
    # and coverage 10/10 -> a false alarm wherever it ranks in the top k; latents 3 and 4 keep >= 77 % in beta
    fa = false_alarms(con, latents, n_labels=1, rate=1.0, draws=2, top_k=5)
    assert fa.schema == schemas.FALSE_ALARMS
    got = {r["score"]: r["false_alarms"] for r in fa.to_pylist()}
    assert got["total"] == 0 and got["frequency"] == 1 and got["firing_kl"] == 0  # 5 ranks 6th, 4th, 6th
    assert set(got) == set(SCORES) | {"frequency", "firing_kl"}
    assert all(v == 1 for v in table_scores(false_alarms(con, latents, n_labels=1, rate=1.0, top_k=10)).values())
    # defaults: the 2 planted labels' mean share (25 of 60 documents) capped at half the 10 ordinary ones
    fa = false_alarms(con, latents)
    assert fa.column("n_labels")[0].as_py() == 2 and fa.column("docs_per_label")[0].as_py() == 5
    assert "2 labels of 5 ordinary documents" in format_false_alarms(fa)
    with pytest.raises(ValueError, match="cannot hold 20 placebo labels"):
        false_alarms(con, latents, n_labels=20)


def table_scores(fa: pa.Table) -> dict[str, float]:
    return {r["score"]: r["false_alarms"] for r in fa.to_pylist()}
