"""Stage 5 task: render the static KL dashboards from the run's tables into `<run>/dashboards/`.

Tables are read through the DuckDB views of storage/duck.py; `latent_tokens` is narrowed in SQL to the rows the
site shows (the listed latents, and the positions of the high-KL tokens), so memory stays bounded on big runs.
Objects on S3 get their content types. `diffsae dashboards` calls `render_dashboards` directly (no recompute).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import task

from diffsae.config import DashboardsConfig
from storage.paths import RunPaths
from storage.store import Store
from tasks.common import IO_RETRY, STAGE_CACHE


def site_ok(store: Store, paths: RunPaths, key: str) -> bool:
    try:
        return store.read_json(f"{paths.dashboards_dir}/site.json").get("key") == key and store.exists(
            f"{paths.dashboards_dir}/index.html"
        )
    except (FileNotFoundError, ValueError):
        return False


def load_site_tables(store_root: str, run: str, cfg: DashboardsConfig) -> Any:
    from dashboards import SiteTables
    from storage import duck

    con = duck.connect(store_root, run)
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
    )


def summary_for(store: Store, paths: RunPaths) -> dict[str, Any]:
    cfg = store.read_json(paths.url("sae", "cfg.json"))
    metrics = store.read_json(paths.url("sae", "metrics.json"))
    sae = cfg.get("sae_config", {})
    from diffsae.config import SAEConfig

    lr = SAEConfig.model_validate(sae).learning_rate if sae else None
    return {
        "run": paths.run,
        "base_model": cfg.get("base"),
        "finetuned_model": cfg.get("finetuned"),
        "layer": cfg.get("layer"),
        "sae": f"BatchTopK, {cfg['n_latents']} latents, k={cfg['k']}, lr={lr:.2g}, batch={sae.get('batch_size')}",
        **{k: metrics.get(k) for k in ("fvu", "l0", "dead_fraction", "kl_gap_recovered")},
    }


def render_dashboards(store_root: str, run: str, cfg: DashboardsConfig, key: str = "") -> dict[str, Any]:
    """Render the site onto the store (atomic per object); returns the index URL and counts."""
    from dashboards import render_site

    paths, store = RunPaths(store_root, run), Store(store_root)
    tables = load_site_tables(store_root, run, cfg)
    root = paths.dashboards_dir

    def out(rel: str, data: bytes, content_type: str) -> None:
        store.write_bytes(f"{root}/{rel}", data, content_type)

    res = render_site(tables, summary_for(store, paths), out, cfg)
    index = f"{root}/index.html"
    info = {
        "key": key,
        "index": index,
        "pages": res.n_pages,
        "files": len(res.files),
        "bytes": res.n_bytes,
        "seconds": res.seconds,
    }
    store.write_json(f"{root}/site.json", info)  # last: marks the stage complete
    return info


@task(name="dashboards", cache_policy=STAGE_CACHE, **IO_RETRY)
def dashboards_task(
    store_root: str, run: str, cfg: dict[str, Any], rank_key: str, key: str
) -> dict[str, Any]:
    return render_dashboards(store_root, run, DashboardsConfig.model_validate(cfg), key)
