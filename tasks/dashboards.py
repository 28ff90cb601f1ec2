"""Stage 5 task: render the static KL dashboards from the run's tables into `<run>/dashboards/`.

Tables are read through the DuckDB views of storage/duck.py; `latent_tokens` is narrowed in SQL to the rows the
site shows (the listed latents, and the positions of the high-KL tokens), so memory stays bounded on big runs.
Objects on S3 get their content types. `dashboards/site.json`, written last, is the stage's marker.
`diffsae dashboards` calls `render_dashboards` directly (no recompute).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import polars as pl
from prefect import task

from dashboards import SiteTables, pages, plots, render, render_site, select
from dashboards.render import template_sources
from diffsae.config import DashboardsConfig, SAEConfig
from storage import duck
from storage.context import RunContext
from tasks.common import IO_RETRY, STAGE_CACHE, code_version, read_marker, stable_hash, stage_key, write_marker


class SiteResult(NamedTuple):
    """The rendered site (`dashboards/site.json`)."""

    key: str
    index: str  # URL of index.html on the store
    pages: int
    files: int
    bytes: int
    seconds: float


def site_key(cfg: DashboardsConfig, rank_key: str, validation_key: str = "") -> str:
    """The dashboards config, the keys of the tables the pages show (ranking, validation) and the renderer's code
    and templates (a new release re-renders)."""
    renderer = code_version(pages, render, select, plots) + stable_hash(*template_sources())
    return stage_key("dashboards", render_dashboards, cfg.model_dump(), rank_key, validation_key, renderer)


def site_done(ctx: RunContext, key: str) -> SiteResult | None:
    out = read_marker(ctx.store, ctx.paths.marker("dashboards"), key, SiteResult)
    return out if out is not None and ctx.store.exists(out.index) else None


def load_site_tables(ctx: RunContext, cfg: DashboardsConfig) -> SiteTables:
    con = ctx.duck()
    views = duck.view_names(con)

    def q(sql: str) -> pl.DataFrame:
        return pl.from_arrow(con.execute(sql).to_arrow_table())  # type: ignore[return-value]

    top = int(cfg.top_latents)
    lt = q(f"""
        WITH top_latents AS (SELECT latent_id FROM latents ORDER BY rank LIMIT {top}),
             hot AS (SELECT doc_id, pos FROM tokens ORDER BY kl DESC LIMIT {int(cfg.n_high_kl_tokens)})
        SELECT lt.* FROM latent_tokens lt
        WHERE lt.latent_id IN (SELECT latent_id FROM top_latents)
           OR (lt.doc_id, lt.pos) IN (SELECT (doc_id, pos) FROM hot)""")
    return SiteTables(
        latents=q("SELECT * FROM latents ORDER BY rank"),
        latent_tokens=lt,
        tokens=q("SELECT * FROM tokens"),
        docs=q("SELECT * FROM docs"),
        metrics=q("SELECT * FROM metrics"),
        recovery=q("SELECT * FROM recovery") if "recovery" in views else None,
        validation=q("SELECT * FROM validation ORDER BY rank") if "validation" in views else None,
        validation_generations=q("SELECT * FROM validation_generations") if "validation_generations" in views else None,
        latent_groups=q("SELECT * FROM latent_groups ORDER BY group_rank, rank") if "latent_groups" in views else None,
    )


DICTIONARIES = {  # cfg.json architecture -> the dashboards' name of the method's dictionary (diffsae/methods.py)
    "batchtopk": "BatchTopK diff-SAE", "batchtopk_crosscoder": "BatchTopK crosscoder (diff of its decoders)",
    "direction": "ADL direction (mean diff over the first positions)",
}  # fmt: skip


def summary_for(ctx: RunContext) -> dict[str, Any]:
    """The site's header: models, layer, SAE (its width in `n_latents`), rank_by and the validation metrics."""
    store, paths = ctx.store, ctx.paths
    cfg = store.read_json(paths.url("sae", "cfg.json"))
    metrics = store.read_json(paths.marker("sae"))
    sae = cfg.get("sae_config", {})
    lr = SAEConfig.model_validate(sae).learning_rate if sae else None
    try:
        marker = store.read_json(paths.marker("ranking"))
    except FileNotFoundError:
        marker = {}
    rank_by, roles, broad = marker.get("rank_by"), marker.get("roles"), marker.get("broad_docs")
    return {
        "run": paths.run,
        "method": paths.method,
        "base_model": cfg.get("base"),
        "finetuned_model": cfg.get("finetuned"),
        "layer": cfg.get("layer"),
        "sae": f"{DICTIONARIES.get(cfg.get('architecture'), 'BatchTopK')}, {cfg['n_latents']} latents, "
        f"k={cfg['k']}, lr={lr:.2g}, batch={sae.get('batch_size')}",
        "n_latents": int(cfg["n_latents"]),
        **({"rank_by": rank_by} if rank_by else {}),
        **({"roles": ", ".join(roles)} if roles else {}),
        **({"broad_docs": broad} if broad else {}),
        **{k: metrics.get(k) for k in ("fvu", "l0", "l0_crossfit", "dead_fraction", "kl_gap_recovered")},
    }


def render_dashboards(ctx: RunContext, cfg: DashboardsConfig, key: str = "") -> SiteResult:
    """Render the site onto the store (atomic per object), site.json last."""
    store, root = ctx.store, ctx.paths.dashboards_dir
    tables = load_site_tables(ctx, cfg)

    def out(rel: str, data: bytes, content_type: str) -> None:
        store.write_bytes(f"{root}/{rel}", data, content_type)

    res = render_site(tables, summary_for(ctx), out, cfg)
    info = SiteResult(key, f"{root}/index.html", res.n_pages, len(res.files), res.n_bytes, res.seconds)
    write_marker(store, ctx.paths.marker("dashboards"), info)  # last: marks the stage complete
    return info


def render_stage(ctx: RunContext, cfg: DashboardsConfig, key: str) -> SiteResult:
    done = site_done(ctx, key)
    return done if done is not None else render_dashboards(ctx, cfg, key)


@task(name="dashboards", cache_policy=STAGE_CACHE, **IO_RETRY)
def dashboards_task(
    ctx: RunContext, cfg: DashboardsConfig, rank_key: str, key: str, validation_key: str = ""
) -> SiteResult:
    return render_stage(ctx, cfg, key)
