"""Latent groups: near-duplicate latents merged so that one behaviour takes one line of the list (issue 15 part 3).

Several latents often encode one behaviour (different tokens of the same answers, or a direction split in two) and
crowd the top of the ranking. storage/sql/latent_groups.sql links two narrow latents when their document sets
overlap with Jaccard >= `min_jaccard` (0.5: each fires on most of the documents the other does); groups form by
leader clustering in rank order (a latent joins the best-ranked leader it is linked to; no chains), ranked by their
leader. `rank.group_by: attribution` links by the latents' attribution over documents instead
(latent_groups_attribution.sql, weighted Jaccard). Why documents and not decoder cosine: latents of one behaviour
on different tokens point different ways but mark the same documents, and near-parallel decoder directions fire
together anyway. Only the head of the list (rank <= `top`) is grouped; every latent stays queryable on its own.

    groups = latent_groups(con, latents, roles=("assistant", "text"))   # schemas.LATENT_GROUPS
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from storage import schemas
from storage.duck import view_names
from storage.ranking import latent_docs_sql, load_sql, registered, render, role_filter

LINKS = {"documents": "latent_groups.sql", "attribution": "latent_groups_attribution.sql"}


def leaders(order: list[int], linked: set[tuple[int, int]]) -> dict[int, int]:
    """Leader clustering: walk the latents best rank first; each joins the first earlier leader it is linked to
    (pairs (a, b), a < b), else leads a new group. Only links to leaders count, so groups never chain: two
    latents in one group are each linked to its leader. A leader is its group's best-ranked member, so rank order
    lists a group leader first (what readers of `latent_groups` rely on). Returns latent -> its leader."""
    leader: dict[int, int] = {}
    heads: list[int] = []
    for lid in order:
        head = next((h for h in heads if (min(h, lid), max(h, lid)) in linked), None)
        if head is None:
            heads.append(lid)
            head = lid
        leader[lid] = head
    return leader


def latent_groups(
    con: duckdb.DuckDBPyConnection,
    latents: pa.Table,
    *,
    roles: tuple[str, ...] | None = None,
    top: int = 500,
    min_jaccard: float = 0.5,
    by: str = "documents",
) -> pa.Table:
    """The `latent_groups` table: one row per grouped latent (rank <= top): group_id (its best member's latent_id),
    group_rank (1 = the group with the best-ranked member), n_members, the latent's own rank and its Jaccard with
    the group's best member, its leader (1.0 for the leader itself). `by`: what a link compares, the latents'
    document sets (`documents`, latent_groups.sql) or their attribution over documents (`attribution`, weighted
    Jaccard, latent_groups_attribution.sql)."""
    if not 0 < min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard}")
    if by not in LINKS:
        raise ValueError(f"group_by must be one of {sorted(LINKS)}, got {by!r}")
    views = view_names(con)
    head = latents.select(["latent_id", "rank"]).filter(pc.less_equal(latents["rank"], top))
    ranks = dict(zip(head["latent_id"].to_pylist(), head["rank"].to_pylist()))
    with registered(con, head=head) as names:
        sql = render(
            load_sql(LINKS[by]),
            latent_docs=latent_docs_sql(views, roles_where=role_filter(con, roles)),
            latents=names["head"],
        )
        pairs = con.execute(sql, {"top": top, "min_jaccard": min_jaccard}).fetchall()
    jaccard = {(a, b): j for a, b, j in pairs}
    order = sorted(ranks, key=lambda m: (ranks[m], m))
    leader = leaders(order, set(jaccard))
    members: dict[int, list[int]] = {}
    for lid in order:
        members.setdefault(leader[lid], []).append(lid)  # leaders in rank order, members in rank order
    rows = []
    for g, (h, ms) in enumerate(members.items(), start=1):
        for lid in ms:
            j = 1.0 if lid == h else jaccard[(min(lid, h), max(lid, h))]
            rows.append((h, g, len(ms), lid, ranks[lid], j))
    return schemas.from_rows(rows, schemas.LATENT_GROUPS)
