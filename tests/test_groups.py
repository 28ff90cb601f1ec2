"""Latent groups (issue 15 part 3) on a hand-built run: exact duplicates merge, latents that never co-fire never
do, and leader clustering does not chain. Document sets and Jaccard indices below are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from storage import schemas
from storage.context import RunContext
from storage.duck import connect
from storage.groups import latent_groups, leaders
from storage.paths import RunPaths
from storage.ranking import rank_latents
from storage.recovery import false_alarms, recovery
from storage.store import Store
from tasks.rank import groups_top
from tests.synthetic import arrow_table

DOCS = {  # latent -> (documents it fires in, attribution per document)
    1: ({0, 1, 2, 3}, 1.0),  # total 4.0
    2: ({0, 1, 2, 3}, 0.5),  # 2.0, the same documents as 1: J = 1
    3: ({4, 5}, 0.9),  # 1.8, never with 1
    7: ({1, 2, 3, 4}, 0.35),  # 1.4, J(1, 7) = 3/5
    4: ({2, 3, 4, 5}, 0.3),  # 1.2, J(1, 4) = 2/6, J(3, 4) = 2/4
    8: ({2, 3, 4, 8}, 0.25),  # 1.0, J(7, 8) = 3/5 but 7 is no leader; J(1, 8) = 2/6, J(3, 8) = 1/5
    5: ({6, 7, 8, 9}, 0.1),  # 0.4, J(5, 8) = 1/7
}
LABELS = ["alpha"] * 4 + ["none"] * 6


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory):
    paths = RunPaths(str(tmp_path_factory.mktemp("s")), "r")
    st = Store(paths.store_root)
    rows = [(lid, d, a) for lid, (docs, a) in DOCS.items() for d in sorted(docs)]
    lat, doc, attr = (np.array([r[i] for r in rows]) for i in range(3))
    st.write_parquet(
        paths.latent_tokens_part(0),
        arrow_table(schemas.LATENT_TOKENS, doc_id=doc, pos=np.zeros(len(rows)), latent_id=lat,
                    activation=np.ones(len(rows)), kl_attribution=attr),
    )  # fmt: skip
    st.write_parquet(paths.table("docs"), arrow_table(schemas.DOCS, doc_id=range(10), behaviour=LABELS))
    st.write_parquet(paths.table("tokens"), arrow_table(schemas.ANALYSIS_TOKENS, doc_id=range(10), pos=[0] * 10))
    return connect(RunContext.create(paths.store, paths.run))


def groups_of(table) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in table.to_pylist():
        out.setdefault(r["group_rank"], []).append(r["latent_id"])
    return out


def test_groups_by_hand(con) -> None:
    latents = rank_latents(con, "total")
    assert latents.column("latent_id").to_pylist() == [1, 2, 3, 7, 4, 8, 5]
    g = latent_groups(con, latents)
    assert g.schema == schemas.LATENT_GROUPS
    # 2 (duplicate) and 7 join leader 1; 4 joins leader 3 (J = 0.5 counts); 8 is linked only to 7 and 4, which
    # are not leaders: its own group, no chain; 5 co-fires with nobody
    assert groups_of(g) == {1: [1, 2, 7], 2: [3, 4], 3: [8], 4: [5]}
    rows = {r["latent_id"]: r for r in g.to_pylist()}
    assert [rows[i]["jaccard"] for i in (1, 2, 7, 3, 4)] == pytest.approx([1.0, 1.0, 0.6, 1.0, 0.5])
    assert rows[7]["group_id"] == 1 and rows[7]["n_members"] == 3 and rows[8]["group_id"] == 8
    strict = groups_of(latent_groups(con, latents, min_jaccard=0.7))  # 0.6 and 0.5 no longer link
    assert strict == {1: [1, 2], 2: [3], 3: [7], 4: [4], 5: [8], 6: [5]}
    assert groups_of(latent_groups(con, latents, top=3)) == {1: [1, 2], 2: [3]}  # only the head is grouped


def test_exact_duplicates_merge_and_disjoint_never_do() -> None:
    assert leaders([10, 11, 12], {(10, 11)}) == {10: 10, 11: 10, 12: 12}
    assert leaders([3, 1, 2], set()) == {3: 3, 1: 1, 2: 2}
    assert leaders([1, 2, 3], {(1, 2), (2, 3)}) == {1: 1, 2: 1, 3: 3}  # 3 is linked to a member only


def test_groups_as_one_entry_in_recovery_and_false_alarms(con) -> None:
    latents = rank_latents(con, "total")
    g = latent_groups(con, latents)
    rec = {(r["score"], r["behaviour"]): r for r in recovery(con, latents, groups=g, top_k=1).to_pylist()}
    # group 1 (latents 1, 2, 7) summed: alpha documents 0-3 hold 4 + 2 + 3 x 0.35, document 4 holds 0.35: 95 %
    assert rec[("groups", "alpha")]["best_rank_v2"] == 1 and rec[("groups", "alpha")]["recovered_v2"]
    assert rec[("total", "alpha")]["best_rank_v2"] == 1
    # placebo: one label over all 6 ordinary documents; only group 4 (latent 5: documents 6-9) passes
    fa = {r["score"]: r["false_alarms"] for r in false_alarms(con, latents, groups=g, n_labels=1, rate=1.0,
                                                                  draws=1, top_k=4).to_pylist()}  # fmt: skip
    assert fa["groups"] == 1 and fa["total"] == 0  # latent 5 ranks 7th alone, its group 4th


def test_groups_summary_by_hand(con) -> None:
    """The rank stage's default list (tasks/rank.py groups_top): leader, members in rank order, summed attribution
    (4.0 + 2.0 + 1.4 for group 1) and the leader's dominant behaviour."""

    latents = rank_latents(con, "total")
    top = groups_top(latent_groups(con, latents), latents)
    assert [(g["group_rank"], g["group_id"], g["n_members"], g["members"]) for g in top] == [
        (1, 1, 3, [1, 2, 7]), (2, 3, 2, [3, 4]), (3, 8, 1, [8]), (4, 5, 1, [5]),
    ]  # fmt: skip
    assert [g["kl_attr_sum"] for g in top] == pytest.approx([7.4, 3.0, 1.0, 0.4])
    assert top[0]["dominant_behaviour"] == "alpha" and top[1]["dominant_behaviour"] == "none"


def test_groups_by_attribution_by_hand(con) -> None:
    """group_by attribution: each latent's attribution over its documents is uniform here (p = 1/|D|), so the
    weighted Jaccard s / (2 - s), s = sum_d min(p_a, p_b), is the set Jaccard for equal-size sets (J(1, 7) = 0.6 both
    ways) but not for unequal ones: 4 spreads half its attribution over documents 2-3, where 3 never fires, so
    s(3, 4) = 2 x min(1/2, 1/4) = 0.5 and J = 1/3 (the set Jaccard was 0.5): 4 leads its own group, and 8 (s(4, 8) =
    3/4, J = 0.6) joins it."""
    latents = rank_latents(con, "total")
    g = latent_groups(con, latents, by="attribution")
    assert groups_of(g) == {1: [1, 2, 7], 2: [3], 3: [4, 8], 4: [5]}
    rows = {r["latent_id"]: r for r in g.to_pylist()}
    assert [rows[i]["jaccard"] for i in (2, 7, 8)] == pytest.approx([1.0, 0.6, 0.6])
    with pytest.raises(ValueError, match="group_by must be one of"):
        latent_groups(con, latents, by="cosine")
