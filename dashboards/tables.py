"""Inputs and outputs of the dashboard renderer, and the checks on its input tables.

The renderer never reads storage: the caller (the pipeline's storage layer, the tests, the bench) hands it the
run's tables as polars DataFrames in a `SiteTables`, with the columns of docs/DESIGN.md, and gets a
`RenderResult` back.

    tables = SiteTables(latents=..., latent_tokens=..., tokens=..., docs=..., metrics=..., recovery=None)
    check_tables(tables)   # raises TableError naming the table and the missing columns
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import polars as pl

# out(relative_path, data, content_type): how the renderer writes one file (local folder, S3, a dict, ...).
Writer = Callable[[str, bytes, str], None]

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
    ".js": "application/javascript",
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "latents": (
        "latent_id",
        "n_active",
        "frequency",
        "mean_activation",
        "max_activation",
        "kl_attr_sum",
        "kl_attr_mean",
        "kl_attr_max",
        "rank",
        "promoted",
        "suppressed",
    ),
    "latent_tokens": ("doc_id", "pos", "latent_id", "activation", "kl_attribution"),
    "tokens": ("doc_id", "pos", "token_id", "token", "role", "kl"),
    "docs": ("doc_id", "id", "text", "behaviour", "n_tokens"),
    "metrics": ("name", "value"),
    "recovery": ("score", "behaviour", "best_rank", "recovered"),
    "validation": ("latent_id", "kl_removed_on_firing", "kl_removed_elsewhere", "generations_changed",
                   "best_steering_scale", "steering_changed"),
    "validation_generations": ("latent_id", "doc_id", "prompt", "variant", "scale", "text"),
    "latent_groups": ("group_id", "group_rank", "n_members", "latent_id", "rank", "jaccard"),
}
# tables a run may lack (None in SiteTables)
OPTIONAL = ("recovery", "validation", "validation_generations", "latent_groups")


class TableError(ValueError):
    """An input table lacks columns the renderer needs (one line)."""


class SiteTables(NamedTuple):
    """The run's tables (columns: docs/DESIGN.md). `recovery` exists only for runs with planted behaviours, the
    validation tables only for runs whose validation stage validated latents."""

    latents: pl.DataFrame
    latent_tokens: pl.DataFrame
    tokens: pl.DataFrame
    docs: pl.DataFrame
    metrics: pl.DataFrame
    recovery: pl.DataFrame | None = None
    validation: pl.DataFrame | None = None
    validation_generations: pl.DataFrame | None = None
    latent_groups: pl.DataFrame | None = None  # runs ranked before groups existed lack it


class RenderResult(NamedTuple):
    """What `render_site` wrote: relative paths (in write order), the latents that got a page, sizes, time."""

    files: tuple[str, ...]
    latent_ids: tuple[int, ...]
    n_pages: int
    n_bytes: int
    seconds: float


def content_type(path: str) -> str:
    """Content type of a site file from its extension (the site only has .html, .css and .js files)."""
    for ext, ctype in CONTENT_TYPES.items():
        if path.endswith(ext):
            return ctype
    raise ValueError(f"no content type for {path!r}")


def check_tables(tables: SiteTables) -> None:
    """Raise `TableError` if a table lacks required columns (OPTIONAL tables are checked only when present)."""
    for name, cols in REQUIRED.items():
        df = getattr(tables, name)
        if df is None:
            if name in OPTIONAL:
                continue
            raise TableError(f"table {name} is missing")
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise TableError(f"table {name} lacks columns {', '.join(missing)} (has {', '.join(df.columns)})")
