"""Static KL dashboards of a diffsae run: `render_site` (storage-agnostic), `render_to_dir` (local folder).

    from dashboards import SiteTables, render_to_dir
    render_to_dir(tables, summary, cfg.dashboards, "out/dashboards")

Modules: tables (inputs/outputs, checks), select (polars selection), plots (histograms -> SVG geometry),
pages (the site's data model), render (Jinja2 rendering), synthetic (test/bench tables). No storage code here.
"""

from dashboards.render import render_site, render_to_dir
from dashboards.tables import RenderResult, SiteTables, TableError, Writer

__all__ = ["RenderResult", "SiteTables", "TableError", "Writer", "render_site", "render_to_dir"]
