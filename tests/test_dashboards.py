"""Tests of the static KL dashboards (dashboards/): pages, links, offline, content types, escaping, selection.

Renders synthetic tables (tests/synthetic.py) into a tmp folder. Run: `pytest tests/test_dashboards.py`.
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pytest

from dashboards import RenderResult, SiteTables, TableError, render_site, render_to_dir
from dashboards.pages import build
from dashboards.render import summary_rows
from dashboards.select import visible
from dashboards.tables import REQUIRED
from diffsae.config import DashboardsConfig
from storage import schemas
from tests.synthetic import SYNTHETIC_SCORES, inject, synthetic_summary, synthetic_tables

CFG = DashboardsConfig(top_latents=20, n_contexts=4, n_high_kl_tokens=15)
PAYLOADS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')
HOSTILE = " ".join(PAYLOADS)


@pytest.fixture(scope="module")
def tables() -> SiteTables:
    return synthetic_tables(n_latents=128, n_docs=60, doc_len=48, seed=1)


@pytest.fixture(scope="module")
def hostile(tables: SiteTables) -> SiteTables:
    return inject(tables, HOSTILE)[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, hostile: SiteTables) -> tuple[Path, RenderResult]:
    out = tmp_path_factory.mktemp("site")
    return out, render_to_dir(hostile, synthetic_summary(hostile), CFG, out)


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs |= {k for k, _ in attrs}
        self.refs += [v for k, v in attrs if k in ("href", "src") and v is not None]


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_every_listed_latent_has_a_page(site: tuple[Path, RenderResult], hostile: SiteTables) -> None:
    out, res = site
    expected = hostile.latents.sort("rank").head(CFG.top_latents)["latent_id"].to_list()
    broad = hostile.latents.drop_nulls("rank_broad").sort("rank_broad").head(CFG.top_latents)["latent_id"]
    assert broad.len() > 0 and not set(broad) <= set(expected)  # the fixture has broad latents beyond the top
    expected += [lid for lid in broad if lid not in expected]  # then the broad changes' pages
    assert list(res.latent_ids) == expected
    for lid in expected:
        assert (out / "latents" / f"{lid}.html").is_file()
    index_refs = set(_parse(out / "index.html").refs)
    assert {f"latents/{lid}.html" for lid in expected} <= index_refs
    assert sorted(res.files) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    n_groups = min(hostile.latent_groups["group_rank"].max(), CFG.top_latents)
    assert res.n_pages == len(expected) + n_groups + 2
    for gid in hostile.latent_groups.filter(pl.col("group_rank") <= CFG.top_latents)["group_id"].unique():
        page = out / "groups" / f"{gid}.html"
        assert page.is_file() and f"groups/{gid}.html" in index_refs
        members = hostile.latent_groups.filter(pl.col("group_id") == gid)["latent_id"].to_list()
        assert all(f">{m}<" in page.read_text() for m in members)  # the group page lists every member
    broad_refs = {v for v in index_refs if v.startswith("latents/")}
    assert {f"latents/{lid}.html" for lid in broad} <= broad_refs


def test_links_resolve_and_nothing_is_remote(site: tuple[Path, RenderResult]) -> None:
    out, _ = site
    html_files = list(out.rglob("*.html"))
    assert html_files
    for page in html_files:
        for ref in _parse(page).refs:
            parts = urlsplit(ref)
            if parts.scheme == "data":
                continue
            assert not parts.scheme and not parts.netloc and not ref.startswith("/"), f"{page}: {ref}"
            if parts.path:
                assert (page.parent / parts.path).resolve().is_file(), f"{page.name}: broken link {ref}"
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            assert not re.search(r"https?://", text, re.I), f"{f} references a URL"


def test_prev_next_follow_rank(site: tuple[Path, RenderResult]) -> None:
    out, res = site
    ids = res.latent_ids
    middle = _parse(out / "latents" / f"{ids[1]}.html").refs
    assert f"{ids[0]}.html" in middle and f"{ids[2]}.html" in middle and "../index.html" in middle
    first = _parse(out / "latents" / f"{ids[0]}.html").refs
    assert f"{ids[1]}.html" in first and not any(r == f"{ids[-1]}.html" for r in first)


def test_content_types(hostile: SiteTables) -> None:
    seen: dict[str, tuple[bytes, str]] = {}
    res = render_site(hostile, synthetic_summary(hostile), lambda p, d, c: seen.__setitem__(p, (d, c)), CFG)
    assert set(seen) == set(res.files)
    for path, (data, ctype) in seen.items():
        want = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "application/javascript"}
        assert ctype == want[Path(path).suffix], path
        assert isinstance(data, bytes)
    assert {"index.html", "tokens.html", "assets/app.js", "assets/style.css"} <= set(seen)
    # assets are served without a charset: they must be pure ASCII
    seen["assets/app.js"][0].decode("ascii")
    seen["assets/style.css"][0].decode("ascii")


def test_rendering_is_deterministic(hostile: SiteTables) -> None:
    runs = []
    for _ in range(2):
        files: dict[str, bytes] = {}
        render_site(hostile, synthetic_summary(hostile), lambda p, d, c: files.__setitem__(p, d), CFG)
        runs.append(files)
    assert runs[0] == runs[1]


def test_hostile_strings_are_escaped(site: tuple[Path, RenderResult], hostile: SiteTables) -> None:
    out, res = site
    top = res.latent_ids[0]
    pages = [out / "index.html", out / "tokens.html", out / "latents" / f"{top}.html"]
    for f in out.rglob("*.html"):
        text = f.read_text(encoding="utf-8")
        for raw in PAYLOADS:
            assert raw not in text, f"{f.name} contains unescaped {raw!r}"
        parsed = _parse(f)
        assert "img" not in parsed.tags, f.name
        assert parsed.tags.count("script") == 1, f.name  # only the app.js include
        assert not [a for a in parsed.attrs if a.startswith("on")], f.name  # no event-handler attributes
    for f in pages:
        text = f.read_text(encoding="utf-8")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, f.name
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in text, f.name


def test_contexts_are_the_top_firings(tables: SiteTables) -> None:
    site = build(tables, CFG, window=5)
    tok = {(d, p): (t, k) for d, p, t, k in tables.tokens.select("doc_id", "pos", "token", "kl").iter_rows()}
    for page in site.latent_pages[:5]:
        lid = page.row.latent_id
        mine = [r for r in tables.latent_tokens.iter_rows(named=True) if r["latent_id"] == lid]
        for firings, col in ((page.by_attr, "kl_attribution"), (page.by_act, "activation")):
            want = sorted((r[col] for r in mine), reverse=True)[: CFG.n_contexts]
            got = [f.attribution if col == "kl_attribution" else f.activation for f in firings]
            assert got == pytest.approx(want)
            for f in firings:
                c = f.ctx
                positions = [p for p in range(c.pos - 5, c.pos + 6) if (c.doc_id, p) in tok]
                assert [t.text for t in c.toks] == [visible(tok[(c.doc_id, p)][0]) for p in positions]
                assert [t.hit for t in c.toks] == [p == c.pos for p in positions]
                assert f"act {f.activation:.3g}" in c.toks[positions.index(c.pos)].tip
        assert page.attr_plot is not None
        assert sum(int(b.tip.rsplit(": ", 1)[1]) for b in page.attr_plot.bars) == len(mine)


def test_high_kl_tokens_and_credits(tables: SiteTables) -> None:
    site = build(tables, CFG, window=3)
    kls = sorted(tables.tokens["kl"].to_list(), reverse=True)[: CFG.n_high_kl_tokens]
    assert [r.kl for r in site.token_rows] == pytest.approx(kls)
    listed = {p.row.latent_id for p in site.latent_pages}  # a credit links to a latent that has a page
    lt = tables.latent_tokens
    for row in site.token_rows:
        here = lt.filter((pl.col("doc_id") == row.ctx.doc_id) & (pl.col("pos") == row.ctx.pos))
        want = sorted(here["kl_attribution"].to_list(), reverse=True)[:5]
        assert [c.attribution for c in row.credits] == pytest.approx(want)
        assert all(c.linked == (c.latent_id in listed) for c in row.credits)


def test_optional_recovery_and_labels(tmp_path: Path, tables: SiteTables) -> None:
    plain = tables._replace(
        recovery=None,
        latents=tables.latents.drop("dominant_behaviour", "dominant_share", "^score_.*$", "^rank_.*$"),
    )
    render_to_dir(plain, {"run": "plain"}, CFG, tmp_path / "a")
    index = (tmp_path / "a" / "index.html").read_text()
    assert "Planted-behaviour recovery" not in index and "dominant behaviour" not in index
    one = tables._replace(recovery=tables.recovery.filter(pl.col("score") == "total"))  # type: ignore[union-attr]
    render_to_dir(one, {"run": "one"}, CFG, tmp_path / "b")
    index = (tmp_path / "b" / "index.html").read_text()
    assert "Planted-behaviour recovery" in index and 'id="score-select"' not in index
    render_to_dir(tables, {"run": "two"}, CFG, tmp_path / "c")
    assert 'id="score-select"' in (tmp_path / "c" / "index.html").read_text()


def test_latent_pages_show_their_validation(tmp_path: Path, tables: SiteTables) -> None:
    site = build(tables, CFG, window=2)
    checked = set(tables.validation["latent_id"].to_list())  # type: ignore[index]
    assert {p.row.latent_id for p in site.latent_pages if p.validation is not None} == checked
    page = next(p for p in site.latent_pages if p.validation is not None)
    v = page.validation
    assert v is not None and len(v.generations) == 2 and len(v.sweep) == 4
    rank = tables.validation.filter(pl.col("latent_id") == page.row.latent_id)["rank"][0]  # type: ignore[union-attr]
    want = tuple(f"{variant} answer {rank}" for variant in ("base", "base+steer", "finetuned", "finetuned-ablated"))
    assert all(g.texts == want for g in v.generations)
    render_to_dir(tables, {"run": "v"}, CFG, tmp_path / "a")
    html = (tmp_path / "a" / "latents" / f"{page.row.latent_id}.html").read_text()
    assert "Causal validation" in html and f"finetuned-ablated answer {rank}" in html
    plain = tables._replace(validation=None, validation_generations=None)
    render_to_dir(plain, {"run": "plain"}, CFG, tmp_path / "b")
    assert "Causal validation" not in (tmp_path / "b" / "latents" / f"{page.row.latent_id}.html").read_text()


def test_group_pages_show_their_validation(tmp_path: Path, tables: SiteTables) -> None:
    """Validated groups (validation.entries: groups): a group's figures on its page, none on its leader's page."""
    groups = tables.latent_groups.filter(pl.col("latent_id") == pl.col("group_id")).sort("group_rank")  # type: ignore[union-attr]
    val = tables.validation.head(2).with_columns(  # type: ignore[union-attr]
        pl.Series("latent_id", groups["group_id"].head(2), dtype=pl.Int32),
        pl.Series("rank", groups["group_rank"].head(2)), pl.lit("group").alias("entry"),
    )
    lead = val["latent_id"][0]
    gens = tables.validation_generations.filter(pl.col("latent_id") == tables.validation["latent_id"][0])  # type: ignore[union-attr, index]
    gens = gens.with_columns(pl.lit(lead, dtype=pl.Int32).alias("latent_id"))
    grouped = tables._replace(validation=val, validation_generations=gens)
    site = build(grouped, CFG, window=2)
    assert all(p.validation is None for p in site.latent_pages)
    checked = {g.group_id: g.validation for g in site.groups if g.validation is not None}
    assert set(checked) == set(val["latent_id"].to_list()) and len(checked[lead].generations) == 2
    render_to_dir(grouped, {"run": "g"}, CFG, tmp_path / "a")
    html = (tmp_path / "a" / "groups" / f"{lead}.html").read_text()
    assert "Causal validation" in html and "each member's" in html and "finetuned-ablated answer 1" in html
    assert "Causal validation" not in (tmp_path / "a" / "latents" / f"{lead}.html").read_text()


def test_summary_shown(site: tuple[Path, RenderResult], hostile: SiteTables) -> None:
    out, _ = site
    text = (out / "index.html").read_text()
    for label in ("FVU", "L0", "Dead fraction", "KL gap recovered", "synthetic/finetuned", "n_latents=128"):
        assert label in text


def _latents_cell(index_html: str) -> str:
    m = re.search(r'<td id="latent-count">([^<]*)</td>', index_html)
    assert m, "no Latents row"
    return m.group(1)


def test_latent_count_is_width_and_never_firing(tmp_path: Path, tables: SiteTables) -> None:
    """The latents table lists only latents that fire (here: the synthetic one without its n_active = 0 rows):
    the index shows the SAE width from summary["n_latents"] and width - firing as never firing."""
    width = tables.latents.height
    firing = tables.latents.filter(pl.col("n_active") > 0)
    n_fire = firing.height
    assert 0 < n_fire < width  # the synthetic dictionary has dead latents
    real = tables._replace(latents=firing)
    for t in (real, tables):  # a table that also lists never-firing latents (n_active 0) counts the same
        count = build(t, CFG, window=2, n_latents=width).latent_count
        assert (count.width, count.firing, count.never) == (width, n_fire, width - n_fire)
    summary = {"run": "w", "n_latents": width}
    render_to_dir(real, summary, CFG, tmp_path / "w")
    index = (tmp_path / "w" / "index.html").read_text()
    assert _latents_cell(index) == f"{width} ({n_fire} fire, {width - n_fire} never fire)"
    assert "n_latents" not in [r.label for r in summary_rows(summary, real.metrics)]  # shown once, in that row
    # older runs: no width in the summary, so no never-firing count either
    render_to_dir(real, {"run": "old"}, CFG, tmp_path / "old")
    assert _latents_cell((tmp_path / "old" / "index.html").read_text()) == f"{n_fire} latents fire"
    assert build(real, CFG, window=2).latent_count.never is None
    with pytest.raises(ValueError, match=f"summary n_latents must be the SAE width, an int >= {n_fire}"):
        build(real, CFG, window=2, n_latents=n_fire - 1)


def test_score_selector_opens_on_rank_by(tmp_path: Path, tables: SiteTables) -> None:
    """The recovery selector starts on summary["rank_by"] when it has a group, else on the first score."""
    assert tables.recovery is not None
    scores = list(dict.fromkeys(tables.recovery["score"].to_list()))
    assert scores == list(SYNTHETIC_SCORES)
    for rank_by, want in (("peak_token", "peak_token"), ("total", "total"), (None, "total"), ("nope", "total")):
        summary = {"run": "sel"} if rank_by is None else {"run": "sel", "rank_by": rank_by}
        render_to_dir(tables, summary, CFG, tmp_path / str(rank_by))
        index = (tmp_path / str(rank_by) / "index.html").read_text()
        options = re.findall(r'<option value="([^"]*)"( selected)?>', index)
        assert [v for v, _ in options] == scores
        assert [v for v, sel in options if sel] == [want], rank_by
        assert build(tables, CFG, window=2, rank_by=rank_by).recovery.selected == want  # type: ignore[union-attr]


def test_synthetic_tables_have_the_storage_schemas(tables: SiteTables) -> None:
    """tests/synthetic.py builds every table with storage/schemas.py, and the renderer requires no column that
    storage does not write."""
    want = {
        "latents": schemas.latents_schema(SYNTHETIC_SCORES),
        "latent_tokens": schemas.LATENT_TOKENS,
        "tokens": schemas.ANALYSIS_TOKENS,
        "docs": schemas.DOCS,
        "metrics": schemas.METRICS,
        "recovery": schemas.RECOVERY,
        "validation": schemas.VALIDATION,
        "validation_generations": schemas.VALIDATION_GENERATIONS,
        "latent_groups": schemas.LATENT_GROUPS,
    }
    assert set(want) == set(REQUIRED) == set(SiteTables._fields)
    for name, schema in want.items():
        assert getattr(tables, name).schema == pl.DataFrame(schema.empty_table()).schema, name
        assert set(REQUIRED[name]) <= set(schema.names), name


def test_non_finite_values_do_not_break_rendering(tmp_path: Path, tables: SiteTables) -> None:
    bad_kl = pl.when(pl.col("pos") == 3).then(float("nan")).when(pl.col("pos") == 4).then(float("inf"))
    broken = tables._replace(
        tokens=tables.tokens.with_columns(bad_kl.otherwise(pl.col("kl")).cast(pl.Float32).alias("kl")),
        latent_tokens=tables.latent_tokens.with_columns(
            pl.when(pl.col("pos") == 5).then(None).otherwise(pl.col("kl_attribution")).alias("kl_attribution")
        ),
    )
    res = render_to_dir(broken, {"run": "nan"}, CFG, tmp_path)
    assert len(res.latent_ids) == len(build(tables, CFG, window=2).latent_pages) >= CFG.top_latents
    site = build(broken, CFG, window=2)
    assert len(site.token_rows) == CFG.n_high_kl_tokens and all(math.isfinite(r.kl) for r in site.token_rows)


def test_missing_column_is_reported(tables: SiteTables) -> None:
    with pytest.raises(TableError, match="latent_tokens lacks columns kl_attribution"):
        render_site(
            tables._replace(latent_tokens=tables.latent_tokens.drop("kl_attribution")), {}, print, CFG
        )


def test_visible_whitespace() -> None:
    assert visible("\n") == "\u23ce" and visible(" ") == "\u00b7" and visible("  ") == "\u00b7\u00b7"
    assert visible("a\tb") == "a\u2192b" and visible(" the") == " the" and visible("") == "\u2205"
