"""Renders the static KL dashboards of a run: index, one page per top latent, the high-KL token explorer.

Storage-agnostic: `render_site` takes the run's tables as polars DataFrames (`SiteTables`) plus a summary dict
and writes every file through `out(relative_path, data, content_type)`, so the caller decides where bytes go
(local folder, S3, memory). Jinja2 autoescapes everything; data never passes through `|safe`; plots are SVG
geometry drawn by the templates. Offline: relative links, two local assets, a CSP that forbids any fetch.

    result = render_to_dir(tables, summary, DashboardsConfig(top_latents=50), "out/dashboards")
    # or: render_site(tables, summary, lambda path, data, ctype: s3.put(path, data, ctype), cfg)

Summary keys shown first when present (else looked up by name in `metrics`): run, method, base_model, finetuned_model,
models, layer, sae, rank_by, fvu, l0, dead_fraction, kl_gap_recovered; any other keys follow, except n_latents (the
SAE width: the "Latents" row shows it with the counts of latents that fire and never fire). rank_by (a score name)
is also the score the recovery table's selector opens on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import polars as pl

from dashboards import pages
from dashboards.plots import fmt
from dashboards.select import visible
from dashboards.tables import RenderResult, SiteTables, Writer, check_tables, content_type
from diffsae.config import DashboardsConfig

ASSETS = ("app.js", "style.css")
TEMPLATE_DIR = Path(__file__).parent / "templates"
HEADLINE = (
    ("run", "Run"),
    ("method", "Method"),
    ("base_model", "Base model"),
    ("finetuned_model", "Finetuned model"),
    ("models", "Models"),
    ("layer", "Layer"),
    ("sae", "SAE"),
    ("rank_by", "Ranked by"),
    ("roles", "Scored token roles"),
    ("broad_docs", "Broad: document share at least"),
    ("fvu", "FVU"),
    ("l0", "L0"),
    ("l0_crossfit", "L0, cross-fitted on held-out documents"),
    ("dead_fraction", "Dead fraction"),
    ("kl_gap_recovered", "KL gap recovered"),
)
PERCENT = {"dead_fraction", "kl_gap_recovered", "broad_docs"}
SHOWN_ELSEWHERE = {"n_latents"}  # summary keys with their own row


class SummaryRow(NamedTuple):
    label: str
    value: str


def environment() -> jinja2.Environment:
    """The Jinja environment: package templates, autoescape on for every template, undefined is an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dashboards", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt
    env.filters["vis"] = visible
    env.filters["repr"] = repr
    env.filters["pct"] = lambda x: "\u2014" if x is None else f"{100 * x:.1f}%"
    return env


def template_sources() -> list[str]:
    """The text of every template and asset, in name order (part of the dashboards stage's key)."""
    return [f.read_text(encoding="utf-8") for f in sorted(TEMPLATE_DIR.iterdir()) if f.is_file()]


def render_site(
    tables: SiteTables,
    summary: dict[str, Any],
    out: Writer,
    cfg: DashboardsConfig,
    *,
    window: int = 24,
) -> RenderResult:
    """Render the whole site through `out`; returns the files written and the latents that got a page."""
    t0 = time.perf_counter()
    check_tables(tables)
    env = environment()
    files: list[str] = []
    n_bytes = 0

    def emit(path: str, data: bytes) -> None:
        nonlocal n_bytes
        out(path, data, content_type(path))
        files.append(path)
        n_bytes += len(data)

    for name in ASSETS:
        source, _, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
        emit(f"assets/{name}", source.encode("utf-8"))

    site = pages.build(
        tables, cfg, window, n_latents=summary.get("n_latents"), rank_by=summary.get("rank_by"),
        roles=str(summary.get("roles") or ""),
    )  # fmt: skip
    run = str(summary.get("run", ""))
    common = {"run": run, "site": site}
    emit(
        "index.html",
        _page(
            env,
            "index.html",
            root="",
            summary=summary_rows(summary, tables.metrics),
            metrics=[(n, fmt(v)) for n, v in tables.metrics.select("name", "value").iter_rows()],
            **common,
        ),
    )
    latent_tpl = env.get_template("latent.html")
    for page in site.latent_pages:
        html = latent_tpl.render(root="../", page=page, **common)
        emit(f"latents/{page.row.latent_id}.html", html.encode("utf-8"))
    group_tpl = env.get_template("group.html")
    for group in site.groups:
        html = group_tpl.render(root="../", group=group, **common)
        emit(f"groups/{group.group_id}.html", html.encode("utf-8"))
    emit("tokens.html", _page(env, "tokens.html", root="", **common))
    return RenderResult(
        files=tuple(files),
        latent_ids=tuple(p.row.latent_id for p in site.latent_pages),
        n_pages=sum(f.endswith(".html") for f in files),
        n_bytes=n_bytes,
        seconds=time.perf_counter() - t0,
    )


def render_to_dir(
    tables: SiteTables,
    summary: dict[str, Any],
    cfg: DashboardsConfig,
    out_dir: str | Path,
    *,
    window: int = 24,
) -> RenderResult:
    """`render_site` into a local folder (created; existing files with the same names are replaced)."""
    root = Path(out_dir)

    def write(rel: str, data: bytes, _ctype: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return render_site(tables, summary, write, cfg, window=window)


def _page(env: jinja2.Environment, name: str, **ctx: Any) -> bytes:
    return env.get_template(name).render(**ctx).encode("utf-8")


def summary_rows(summary: dict[str, Any], metrics: pl.DataFrame) -> list[SummaryRow]:
    """Headline rows first (summary value, else the metric of that name), then the other summary keys."""
    metric = dict(metrics.select("name", "value").iter_rows())
    rows = []
    for key, label in HEADLINE:
        value = summary.get(key, metric.get(key))
        if value is None:
            continue
        rows.append(SummaryRow(label, _value(value, pct=key in PERCENT)))
    known = {k for k, _ in HEADLINE} | SHOWN_ELSEWHERE
    rows += [SummaryRow(str(k), _value(v)) for k, v in summary.items() if k not in known]
    return rows


def _value(v: Any, pct: bool = False) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return f"{fmt(v)} ({100 * v:.1f}%)" if pct else fmt(v)
    return str(v)
