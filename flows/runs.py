"""What is on a store, for `diffsae runs` and `diffsae open`: the runs, each stage's state, a run's dashboards.

Why from the markers: a stage's marker (written last, holding its key) is the one truth about "done" (see
docs/DESIGN.md), and reading a few small files per run is cheap on a local folder and on S3 alike. A stage is

    done     its marker exists and nothing upstream says otherwise
    missing  no marker
    stale    its upstream is missing or stale, or was rewritten after it: the SAE was trained on activations
             with another fingerprint (sae/cfg.json vs the manifest), or an upstream marker is newer than the
             stage's own (a retrained SAE, a new ranking): the pipeline would recompute it

Staleness is what can be told without the config: a changed config section (e.g. `attribution.steps`) shows only
when the pipeline runs.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from storage.context import RunContext
from storage.paths import MARKERS, join

# (stage, marker relative to the run root, upstream stage), in pipeline order
STAGES: tuple[tuple[str, str, str | None], ...] = tuple(
    (stage, marker, prev) for (stage, marker), prev in zip(MARKERS.items(), (None, *MARKERS))
)


class RunError(RuntimeError):
    """A run that does not exist, or lacks what the command needs: reported as one line, exit status 2."""


class StageState(NamedTuple):
    stage: str
    state: str  # done | missing | stale
    why: str = ""


def _modified(ctx: RunContext, url: str) -> Any:
    """The object's modification time (a datetime), or None when the store does not say."""
    try:
        return ctx.store.modified(url)
    except Exception:  # noqa: BLE001 - some filesystems do not implement it: then no time-based staleness
        return None


def _read_json(ctx: RunContext, url: str) -> Any:
    try:
        return ctx.store.read_json(url)
    except Exception:  # noqa: BLE001 - missing or unreadable
        return None


def store_exists(ctx: RunContext) -> bool:
    return ctx.store.isdir(ctx.store_url) if not ctx.is_s3 else ctx.store.exists(ctx.store_url)


def list_runs(ctx: RunContext) -> list[str]:
    """Names of the runs on the store (folders under `<store>/runs/`), sorted."""
    return [n for n in ctx.store.subdirs(join(ctx.store_url, "runs")) if n and not n.startswith(".")]


def run_exists(ctx: RunContext) -> bool:
    return ctx.store.isdir(ctx.paths.root)


def require_run(ctx: RunContext) -> None:
    if not run_exists(ctx):
        raise RunError(f"run '{ctx.run}' does not exist on {ctx.store_url}")


def run_status(ctx: RunContext) -> list[StageState]:
    """Each stage's state (done / missing / stale), in pipeline order."""
    out: dict[str, StageState] = {}
    times: dict[str, Any] = {}
    for stage, marker, upstream in STAGES:
        url = ctx.paths.url(marker)
        if not ctx.store.exists(url):
            out[stage] = StageState(stage, "missing")
            continue
        times[stage] = _modified(ctx, url)
        up = out.get(upstream) if upstream else None
        if up is not None and up.state != "done":
            out[stage] = StageState(stage, "stale", f"{upstream} is {up.state}")
        elif stage == "sae" and not _same_activations(ctx):
            out[stage] = StageState(stage, "stale", "trained on other activations")
        elif up is not None and _newer(times.get(upstream), times[stage]):
            out[stage] = StageState(stage, "stale", f"{upstream} rewritten after it")
        else:
            out[stage] = StageState(stage, "done")
    return [out[s] for s, _, _ in STAGES]


def _newer(upstream_time: Any, own_time: Any) -> bool:
    return upstream_time is not None and own_time is not None and upstream_time > own_time


def _same_activations(ctx: RunContext) -> bool:
    manifest = _read_json(ctx, ctx.paths.activations_manifest) or {}
    cfg = _read_json(ctx, ctx.paths.url("sae", "cfg.json")) or {}
    fp = cfg.get("activations_fingerprint")
    return fp is None or fp == manifest.get("fingerprint")


def format_runs(ctx: RunContext, runs: list[str]) -> str:
    """The `diffsae runs` table: one line per run, one column per stage."""
    if not runs:
        return f"no runs on {ctx.store_url}\n"
    rows = []
    for name in runs:
        states = run_status(RunContext(ctx.store_url, name, ctx.endpoint_url))
        rows.append([name] + [s.state + (f" ({s.why})" if s.why else "") for s in states])
    header = ["run"] + [s for s, _, _ in STAGES]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return f"store {ctx.store_url}\n" + "\n".join(lines) + "\n"


def dashboards_index(ctx: RunContext) -> str:
    """A local path of the run's dashboards index.html (on S3: of a local copy of `dashboards/`)."""
    require_run(ctx)
    site = _read_json(ctx, ctx.paths.marker("dashboards"))
    index = ctx.paths.url("dashboards", "index.html")
    if site is None or not ctx.store.exists(index):
        where = f"run '{ctx.run}' on {ctx.store_url}"
        raise RunError(f"{where} has no dashboards: run `diffsae run` or `diffsae dashboards`")
    if not ctx.is_s3:
        return index
    return os.path.join(ctx.mirror(ctx.paths.dashboards_dir), "index.html")
