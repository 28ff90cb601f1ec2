"""The data model of the site: everything the templates show, computed from the tables in one pass.

`build(tables, cfg, window)` returns a `Site`: the index rows, the per-token KL histogram, the recovery table,
one `LatentPage` per listed latent (histograms, contexts by attribution and by activation, prev/next, and its
causal validation when the run has one) and the high-KL token rows. All selection runs in polars
(dashboards/select.py); Python only reshapes selected rows.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, NamedTuple

import polars as pl

from dashboards import select
from dashboards.plots import SvgPlot, fmt, histogram, histograms, svg_histogram
from dashboards.select import Context
from dashboards.tables import SiteTables
from diffsae.config import DashboardsConfig

PATCH_COLS = ("kl_patch_base", "kl_patch_bias", "kl_patch_recon")
N_CREDITS = 5
VARIANTS = ("base", "base+steer", "finetuned", "finetuned-ablated")  # validation_generations, shown in this order


class LatentRow(NamedTuple):
    latent_id: int
    rank: int | None
    kl_attr_sum: float
    kl_attr_mean: float
    kl_attr_max: float
    frequency: float
    mean_activation: float
    max_activation: float
    n_active: int
    ranks: tuple[int | None, ...]  # the rank_* columns, in Site.rank_cols order
    scores: tuple[float | None, ...]  # the score_* columns, in Site.score_cols order
    behaviour: str | None
    share: float | None
    promoted: tuple[str, ...]
    suppressed: tuple[str, ...]
    rank_broad: int | None = None  # position in the broad-changes list (None: not broad, or a run without it)
    doc_share: float | None = None  # share of documents where it fires on the analysed tokens
    doc_share_all: float | None = None  # ... on any token
    pos_mass_all: float | None = None  # positive KL attribution mass on any token


class Firing(NamedTuple):
    ctx: Context
    activation: float
    attribution: float


class Generation(NamedTuple):
    """One prompt of a validated latent and its greedy answer under each of VARIANTS (None: missing)."""

    doc_id: int
    prompt: str
    texts: tuple[str | None, ...]


class Validation(NamedTuple):
    """A latent's row of the `validation` table (tasks/validate.py) and its generations."""

    kl_removed_on_firing: float | None
    kl_removed_elsewhere: float | None
    generations_changed: float | None
    best_steering_scale: float | None
    steering_changed: float | None
    n_firing_tokens: int | None
    typical_activation: float | None
    sweep: tuple[tuple[float, float | None], ...]  # (steering scale, coherence NLL of its answers)
    coherence_limit: float | None
    generations: tuple[Generation, ...]


class LatentPage(NamedTuple):
    row: LatentRow
    prev: int | None
    next: int | None
    attr_plot: SvgPlot | None
    act_plot: SvgPlot | None
    by_attr: tuple[Firing, ...]
    by_act: tuple[Firing, ...]
    validation: Validation | None = None


class Credit(NamedTuple):
    latent_id: int
    attribution: float
    activation: float
    linked: bool  # the latent has a page


class TokenRow(NamedTuple):
    ctx: Context
    kl: float
    patches: tuple[tuple[str, float | None], ...]
    credits: tuple[Credit, ...]


class RecoveryGroup(NamedTuple):
    score: str
    rows: tuple[tuple[tuple[str, str], ...], ...]  # per row: (text, css class) per column
    n_recovered: int  # v1
    n_recovered_v2: float | None  # v2 on held-out documents (random: expected); None for runs without it


class Recovery(NamedTuple):
    columns: tuple[str, ...]
    groups: tuple[RecoveryGroup, ...]
    selected: str  # the score the selector opens on: the run's rank_by when it has a group, else the first


class LatentCount(NamedTuple):
    """The index's "Latents" row. The latents table has one row per latent that fires, so the never-firing count
    needs the SAE's dictionary size (`width`, summary["n_latents"]); runs that predate it only say what fires."""

    firing: int  # rows of the latents table with n_active > 0
    width: int | None

    @property
    def never(self) -> int | None:
        return None if self.width is None else self.width - self.firing


class Group(NamedTuple):
    group_id: int  # its leader's latent_id
    group_rank: int
    members: tuple[LatentRow, ...]  # leader first, then by rank
    jaccard: tuple[float | None, ...]  # each member's document-set Jaccard with the leader
    paged: tuple[bool, ...]  # whether each member has a latent page
    validation: Validation | None = None  # when the validation stage validated groups (validation.entries)


class Site(NamedTuple):
    rows: tuple[LatentRow, ...]
    groups: tuple[Group, ...]  # the first top_latents groups (empty for runs without latent_groups)
    broad: tuple[LatentRow, ...]  # the broad changes, by rank_broad (empty for runs ranked without the split)
    roles: str  # the analysed token roles, comma-separated ("": unknown, every token)
    rank_cols: tuple[str, ...]
    score_cols: tuple[str, ...]
    has_labels: bool
    latent_count: LatentCount
    n_tokens: int
    kl_plot: SvgPlot | None
    kl_scale: float
    recovery: Recovery | None
    latent_pages: tuple[LatentPage, ...]
    token_rows: tuple[TokenRow, ...]
    window: int


def build(
    tables: SiteTables,
    cfg: DashboardsConfig,
    window: int,
    *,
    n_latents: int | None = None,
    rank_by: str | None = None,
    roles: str = "",
) -> Site:
    """The site's data. `n_latents`: the SAE's dictionary size (None: unknown); `rank_by`: the run's ranking score
    (a score name; the recovery selector opens on it); `roles`: the token roles the ranking scored. Latent pages:
    the top `cfg.top_latents` by rank, then as many broad changes by rank_broad."""
    lat = select.top_latents(tables.latents, cfg.top_latents)
    wide = select.broad_latents(tables.latents, cfg.top_latents)
    rank_cols = tuple(c for c in tables.latents.columns if c.startswith("rank_") and c != "rank_broad")
    score_cols = tuple(c for c in tables.latents.columns if c.startswith("score_"))
    has_labels = "dominant_behaviour" in tables.latents.columns
    rows = tuple(_latent_row(r, rank_cols, score_cols) for r in lat.iter_rows(named=True))
    broad = tuple(_latent_row(r, rank_cols, score_cols) for r in wide.iter_rows(named=True))
    listed = {r.latent_id for r in rows}
    paged = rows + tuple(r for r in broad if r.latent_id not in listed)
    groups = _groups(tables, cfg.top_latents, rank_cols, score_cols, {r.latent_id for r in paged})
    checked = _validations(tables, "group")
    groups = tuple(g._replace(validation=checked.get(g.group_id)) for g in groups)
    scale = select.kl_scale(tables.tokens)
    kl_hist = histogram(tables.tokens["kl"].cast(pl.Float64), bins=50)
    return Site(
        rows=rows,
        groups=groups,
        broad=broad,
        roles=roles,
        rank_cols=rank_cols,
        score_cols=score_cols,
        has_labels=has_labels,
        latent_count=latent_count(tables.latents, n_latents),
        n_tokens=tables.tokens.height,
        kl_plot=svg_histogram(kl_hist, "per-token KL(ft \u2016 base), nats", log_y=True) if kl_hist else None,
        kl_scale=scale,
        recovery=_recovery(tables.recovery, rank_by),
        latent_pages=_latent_pages(tables, pl.Series([r.latent_id for r in paged]), paged, cfg, window, scale),
        token_rows=_token_rows(tables, {r.latent_id for r in paged}, cfg, window, scale),
        window=window,
    )


def _groups(
    tables: SiteTables, n: int, rank_cols: tuple[str, ...], score_cols: tuple[str, ...], paged: set[int]
) -> tuple[Group, ...]:
    """The first `n` latent groups with their members' rows (latent_groups joined to latents)."""
    if tables.latent_groups is None or tables.latent_groups.height == 0:
        return ()
    g = tables.latent_groups.filter(pl.col("group_rank") <= n)
    lat = tables.latents.join(g.select("latent_id", "group_id", "group_rank", "jaccard"), on="latent_id")
    out = []
    for (gid, grank), part in lat.sort("group_rank", "rank").group_by(
        "group_id", "group_rank", maintain_order=True
    ):
        members = tuple(_latent_row(r, rank_cols, score_cols) for r in part.iter_rows(named=True))
        out.append(
            Group(
                group_id=int(gid),
                group_rank=int(grank),
                members=members,
                jaccard=tuple(part["jaccard"].to_list()),
                paged=tuple(m.latent_id in paged for m in members),
            )
        )
    return tuple(out)


def latent_count(latents: pl.DataFrame, width: int | None) -> LatentCount:
    """Firing latents (rows with n_active > 0: a latents table may also list never-firing ones with n_active 0)
    and the dictionary size; a width below the firing count is a bug upstream, reported as one line."""
    firing = int((latents["n_active"] > 0).sum())
    if width is None:
        return LatentCount(firing, None)
    if isinstance(width, bool) or not isinstance(width, Integral) or width < firing:
        raise ValueError(f"summary n_latents must be the SAE width, an int >= {firing} (latents that fire): {width!r}")
    return LatentCount(firing, int(width))


def _latent_row(r: dict[str, Any], rank_cols: tuple[str, ...], score_cols: tuple[str, ...]) -> LatentRow:
    return LatentRow(
        latent_id=int(r["latent_id"]),
        rank=r["rank"],
        kl_attr_sum=r["kl_attr_sum"],
        kl_attr_mean=r["kl_attr_mean"],
        kl_attr_max=r["kl_attr_max"],
        frequency=r["frequency"],
        mean_activation=r["mean_activation"],
        max_activation=r["max_activation"],
        n_active=r["n_active"],
        ranks=tuple(r[c] for c in rank_cols),
        scores=tuple(r[c] for c in score_cols),
        behaviour=r.get("dominant_behaviour"),
        share=r.get("dominant_share"),
        promoted=tuple(r["promoted"] or ()),
        suppressed=tuple(r["suppressed"] or ()),
        rank_broad=r.get("rank_broad"),
        doc_share=r.get("doc_share"),
        doc_share_all=r.get("doc_share_all"),
        pos_mass_all=r.get("pos_mass_all"),
    )


def _latent_pages(
    tables: SiteTables,
    ids: pl.Series,
    rows: tuple[LatentRow, ...],
    cfg: DashboardsConfig,
    window: int,
    scale: float,
) -> tuple[LatentPage, ...]:
    ids = ids.cast(tables.latent_tokens.schema["latent_id"])
    lt = tables.latent_tokens.join(pl.DataFrame({"latent_id": ids}), on="latent_id", how="semi")
    attr_h = histograms(lt, "latent_id", "kl_attribution", bins=40)
    act_h = histograms(lt, "latent_id", "activation", bins=40)
    ctx = select.latent_contexts(lt, ids, cfg.n_contexts)
    win = select.windows(ctx, tables.tokens, tables.docs, window, scale, latent_tokens=lt)
    firings: dict[tuple[int, str], list[Firing]] = {}
    for lid, doc_id, pos, act, attr, kind in ctx.select(
        "latent_id", "doc_id", "pos", "activation", "kl_attribution", "kind"
    ).iter_rows():
        c = win.get((lid, doc_id, pos))
        if c is not None:
            firings.setdefault((lid, kind), []).append(Firing(c, act, attr))
    checked = _validations(tables, "latent")
    pages = []
    for i, row in enumerate(rows):
        lid = row.latent_id
        ah, vh = attr_h.get(lid), act_h.get(lid)
        pages.append(
            LatentPage(
                row=row,
                prev=rows[i - 1].latent_id if i > 0 else None,
                next=rows[i + 1].latent_id if i + 1 < len(rows) else None,
                attr_plot=svg_histogram(ah, "KL attribution per firing (nats)") if ah else None,
                act_plot=svg_histogram(vh, "activation") if vh else None,
                by_attr=tuple(firings.get((lid, "attr"), ())),
                by_act=tuple(firings.get((lid, "act"), ())),
                validation=checked.get(lid),
            )
        )
    return tuple(pages)


def _validations(tables: SiteTables, entry: str) -> dict[int, Validation]:
    """Per validated entry of that kind ("latent"; "group": by its leader's latent_id): its validation row and its
    generations, prompt by prompt (VARIANTS order). Tables written before groups were validated are all latents."""
    if tables.validation is None or tables.validation.height == 0:
        return {}
    kind = (tables.validation["entry"][0] if "entry" in tables.validation.columns else None) or "latent"
    if kind != entry:
        return {}
    gens: dict[int, dict[tuple[int, str], dict[str, str]]] = {}
    if tables.validation_generations is not None:
        for g in tables.validation_generations.iter_rows(named=True):
            per = gens.setdefault(int(g["latent_id"]), {}).setdefault((int(g["doc_id"]), g["prompt"]), {})
            per[g["variant"]] = g["text"]
    out = {}
    for r in tables.validation.iter_rows(named=True):
        lid = int(r["latent_id"])
        sweep = tuple(zip(r.get("steering_scales") or (), r.get("steering_nll") or ()))
        out[lid] = Validation(
            kl_removed_on_firing=r["kl_removed_on_firing"],
            kl_removed_elsewhere=r["kl_removed_elsewhere"],
            generations_changed=r["generations_changed"],
            best_steering_scale=r["best_steering_scale"],
            steering_changed=r["steering_changed"],
            n_firing_tokens=r.get("n_firing_tokens"),
            typical_activation=r.get("typical_activation"),
            sweep=sweep,
            coherence_limit=r.get("coherence_limit"),
            generations=tuple(
                Generation(doc_id, prompt, tuple(texts.get(v) for v in VARIANTS))
                for (doc_id, prompt), texts in gens.get(lid, {}).items()
            ),
        )
    return out


def _token_rows(
    tables: SiteTables, listed: set[int], cfg: DashboardsConfig, window: int, scale: float
) -> tuple[TokenRow, ...]:
    top = select.high_kl_tokens(tables.tokens, cfg.n_high_kl_tokens)
    win = select.windows(top, tables.tokens, tables.docs, window, scale)
    credits: dict[tuple[int, int], list[Credit]] = {}
    for doc_id, pos, lid, act, attr in (
        select.credits_at(tables.latent_tokens, top, N_CREDITS)
        .select("doc_id", "pos", "latent_id", "activation", "kl_attribution")
        .iter_rows()
    ):
        credits.setdefault((doc_id, pos), []).append(Credit(int(lid), attr, act, int(lid) in listed))
    patch_cols = [c for c in PATCH_COLS if c in top.columns]
    out = []
    for r in top.iter_rows(named=True):
        key = (r["doc_id"], r["pos"])
        if key not in win:
            continue
        out.append(
            TokenRow(
                ctx=win[key],
                kl=r["kl"],
                patches=tuple((c.removeprefix("kl_patch_"), r[c]) for c in patch_cols),
                credits=tuple(credits.get(key, ())),
            )
        )
    return tuple(out)


def _recovery(rec: pl.DataFrame | None, rank_by: str | None) -> Recovery | None:
    if rec is None or rec.height == 0:
        return None
    columns = tuple(c for c in rec.columns if c != "score")
    groups = []
    for (score,), part in rec.partition_by("score", as_dict=True, maintain_order=True).items():
        rows = []
        for r in part.iter_rows(named=True):
            cells = []
            for c in columns:
                v = r[c]
                if isinstance(v, bool):
                    cells.append(("yes" if v else "no", "ok" if v else "miss"))
                elif isinstance(v, (int, float)):
                    cells.append((fmt(v), "num"))
                else:
                    cells.append(("\u2014" if v is None else str(v), ""))
            rows.append(tuple(cells))
        n_rec = int(part["recovered"].cast(pl.Boolean).fill_null(False).sum())
        v2 = float(part["expected_v2"].fill_null(0.0).sum()) if "expected_v2" in part.columns else None
        groups.append(RecoveryGroup(str(score), tuple(rows), n_rec, v2))
    scores = [g.score for g in groups]
    return Recovery(columns, tuple(groups), rank_by if rank_by in scores else scores[0])
