"""Broad vs narrow, by role (issue 15 part 4): the narrow ranking scores only the analysed roles' tokens, latents
firing in at least `broad_docs` of the documents go to their own list (rank_broad), and recovery judges capture on
the analysed tokens. Every figure below is computed by hand from ROWS."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from diffsae.attribution import latent_doc_stats
from diffsae.config import SCORES, PipelineConfig
from storage import schemas
from storage.context import RunContext
from storage.duck import connect
from storage.paths import RunPaths
from storage.ranking import RankParams, rank_latents
from storage.recovery import recovery
from storage.store import Store
from tests.synthetic import arrow_table

N_DOCS = 10
LABELS = ["alpha", "alpha"] + ["none"] * (N_DOCS - 2)
ROLES_BY_POS = ["template", "user", "assistant", "assistant"]  # every document: 4 tokens
# (latent_id, doc_id, pos, kl_attribution); activation 1.0 everywhere
ROWS = [
    *[(1, d, 0, 1.0) for d in range(N_DOCS)],  # 1: the system prompt, every document: broad, never narrow
    *[(2, d, 2, 0.2) for d in range(6)],  # 2: a style on 6 of 10 answers: broad (0.6 >= 0.5), not narrow
    *[(3, d, 3, 0.5) for d in (0, 1)],  # 3: alpha's answers (narrow, 2 docs) ...
    *[(3, d, 0, 0.05) for d in range(N_DOCS)],  # ... and a little on the template everywhere (broad too)
    (4, 3, 1, 0.7),  # 4: one user token: neither narrow (no analysed firing) nor broad
    (5, 4, 2, 0.3),  # 5: one answer token of an ordinary document: narrow
]
ANALYSED = ("assistant", "text")


def write_run(store: str, latent_docs: bool) -> RunPaths:
    paths = RunPaths(store, "r")
    st = Store(paths.store_root)
    lat, doc, pos, attr = (np.array([r[i] for r in ROWS]) for i in range(4))
    st.write_parquet(
        paths.latent_tokens_part(0),
        arrow_table(schemas.LATENT_TOKENS, doc_id=doc, pos=pos, latent_id=lat,
                    activation=np.ones(len(ROWS)), kl_attribution=attr),
    )  # fmt: skip
    if latent_docs:
        stats = latent_doc_stats(doc, lat, np.ones(len(ROWS), np.float32), attr.astype(np.float32))
        st.write_parquet(paths.latent_docs_part(0), pa.table(stats._asdict(), schema=schemas.LATENT_DOCS))
    st.write_parquet(paths.table("docs"), arrow_table(schemas.DOCS, doc_id=range(N_DOCS), behaviour=LABELS))
    st.write_parquet(
        paths.table("tokens"),
        arrow_table(schemas.ANALYSIS_TOKENS, doc_id=[d for d in range(N_DOCS) for _ in ROLES_BY_POS],
                    pos=list(range(len(ROLES_BY_POS))) * N_DOCS, role=ROLES_BY_POS * N_DOCS),
    )  # fmt: skip
    return paths


@pytest.fixture(params=["latent_docs", "tokens_only"])
def con(tmp_path, request: pytest.FixtureRequest):
    paths = write_run(str(tmp_path / "s"), latent_docs=request.param == "latent_docs")
    return connect(RunContext.create(paths.store, paths.run))


def rows(table: pa.Table) -> dict[int, dict]:
    return {r["latent_id"]: r for r in table.to_pylist()}


def test_narrow_and_broad_by_hand(con) -> None:
    table = rank_latents(con, "total", params=RankParams(roles=ANALYSED, broad_docs=0.5))
    assert table.schema == schemas.latents_schema(SCORES)
    got = rows(table)
    assert sorted(got) == [1, 2, 3, 4, 5]  # every latent that fires anywhere has a row
    # narrow: 3 (total 1.0 on its two answer tokens) then 5 (0.3); the others have no narrow rank
    assert {lid: r["rank_total"] for lid, r in got.items()} == {1: None, 2: None, 3: 1, 4: None, 5: 2}
    assert {lid: r["rank"] for lid, r in got.items()} == {1: None, 2: None, 3: 1, 4: None, 5: 2}
    # broad by positive mass on any token: 1 (10 x 1.0), 3 (2 x 0.5 + 10 x 0.05 = 1.5), 2 (6 x 0.2)
    assert {lid: r["rank_broad"] for lid, r in got.items()} == {1: 1, 2: 3, 3: 2, 4: None, 5: None}
    assert got[3]["pos_mass_all"] == pytest.approx(1.5) and got[3]["pos_mass"] == pytest.approx(1.0)
    assert {lid: r["doc_share"] for lid, r in got.items()} == pytest.approx({1: 0, 2: 0.6, 3: 0.2, 4: 0, 5: 0.1})
    assert {lid: r["doc_share_all"] for lid, r in got.items()} == pytest.approx({1: 1, 2: 0.6, 3: 1, 4: 0.1, 5: 0.1})
    # statistics read the analysed tokens only: 3 fires on 2 of the 20 answer tokens
    assert got[3]["n_active"] == 2 and got[3]["frequency"] == pytest.approx(2 / 20)
    assert got[3]["kl_attr_sum"] == pytest.approx(1.0) and got[1]["n_active"] == 0
    assert got[1]["kl_attr_sum"] is None and got[1]["score_mean"] is None
    # on the analysed tokens all of 3's mass is in alpha's documents
    assert got[3]["dominant_behaviour"] == "alpha" and got[3]["dominant_share"] == pytest.approx(1.0)
    # sorted by rank, then the broad list, then the rest by id
    assert table.column("latent_id").to_pylist() == [3, 5, 1, 2, 4]


def test_without_roles_or_broad_every_latent_is_narrow(con) -> None:
    got = rows(rank_latents(con, "total"))
    # total on every token: 1 (10.0), 2 (1.2), 3 (1.5), 4 (0.7), 5 (0.3)
    assert {lid: r["rank_total"] for lid, r in got.items()} == {1: 1, 3: 2, 2: 3, 4: 4, 5: 5}
    assert all(r["rank_broad"] is None for r in got.values())
    assert got[3]["doc_share"] == got[3]["doc_share_all"] == 1.0


def test_broad_share_is_a_threshold(con) -> None:
    # at 0.7 latent 2 (6 of 10 documents) is narrow again; 1 and 3 stay broad through the template
    got = rows(rank_latents(con, "total", params=RankParams(roles=ANALYSED, broad_docs=0.7)))
    assert got[2]["rank_total"] == 1 and got[2]["rank_broad"] is None  # 1.2 > 3's 1.0
    assert got[1]["rank_broad"] == 1 and got[3]["rank_broad"] == 2


def test_recovery_judges_capture_on_the_analysed_tokens(con) -> None:
    narrow = rank_latents(con, "total", params=RankParams(roles=ANALYSED, broad_docs=0.5))
    rec = {(r["score"], r["behaviour"]): r for r in recovery(con, narrow, roles=ANALYSED).to_pylist()}
    assert rec[("total", "alpha")]["best_rank"] == 1 and rec[("total", "alpha")]["recovered"]
    # on every token 3's alpha share is (1.0 + 2 x 0.05) / 1.5 = 0.73 < 0.8: no latent captures alpha
    everything = rank_latents(con, "total")
    rec_all = {(r["score"], r["behaviour"]): r for r in recovery(con, everything).to_pylist()}
    assert rec_all[("total", "alpha")]["best_rank"] is None


def test_roles_covering_every_token_change_nothing(con) -> None:
    a = rank_latents(con, "mean", params=RankParams(roles=("template", "user", "assistant")))
    b = rank_latents(con, "mean")
    assert a.equals(b)


def test_rank_config_defaults_and_bad_role() -> None:
    cfg = PipelineConfig()
    assert cfg.rank.roles == ["assistant", "text"] and cfg.rank.broad_docs == 0.9
    with pytest.raises(ValueError, match="roles"):
        PipelineConfig(rank={"roles": ["assistant", "narrator"]})
    with pytest.raises(ValueError, match="broad_docs"):
        PipelineConfig(rank={"broad_docs": 0})

