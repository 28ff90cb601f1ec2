"""Every path of the artifact store, built in one place.

A store is a local folder or `s3://bucket/prefix`; the two differ only by the root URL. All outputs of a run live
under `<store>/runs/<run>/<stage>/...`; the stages a method owns (`sae`, `analysis`, `dashboards`) live under
`<store>/runs/<run>/methods/<method>/<stage>/...` for every method but the default `diff_sae`, whose outputs stay
where they were before methods existed (the activations, the lock and the cache are shared by every method):

    p = RunPaths("s3://bucket/team", "demo")
    p.shard(3)            # s3://bucket/team/runs/demo/activations/shard-00003.parquet
    p.table("latents")    # s3://bucket/team/runs/demo/analysis/latents.parquet
    p.attribution_part("latent_tokens", 3, "0a1b2c3d4e5f", 0)
                          # .../analysis/latent_tokens/shard-00003-0a1b2c3d4e5f-000.parquet
    RunPaths("s3://bucket/team", "demo", "crosscoder").table("latents")
                          # s3://bucket/team/runs/demo/methods/crosscoder/analysis/latents.parquet
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from storage.schemas import TABLES

# Each stage's completion marker (relative to the run root), in pipeline order: written last, it holds the stage's
# key and result (tasks/common.py). The store-wide demo pair's marker is `cache/demo_pair/<key>/DONE.json`.
MARKERS: dict[str, str] = {
    "activations": "activations/manifest.json",
    "sae": "sae/metrics.json",
    "attribution": "analysis/attribution.json",
    "ranking": "analysis/ranking.json",
    "validation": "analysis/validation.json",
    "dashboards": "dashboards/site.json",
}


DEFAULT_METHOD = "diff_sae"
METHOD_STAGES = frozenset({"sae", "analysis", "dashboards"})  # folders each method has its own copy of


def normalize_root(store: str) -> str:
    """`s3://b/p/` -> `s3://b/p`; a local folder -> its absolute path (file:// stripped)."""
    if store.startswith("s3://"):
        return store.rstrip("/")
    if store.startswith("file://"):
        store = store[len("file://") :]
    return os.path.abspath(os.path.expanduser(store))


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(*parts: str) -> str:
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest if p])


@dataclass(frozen=True)
class RunPaths:
    store: str
    run: str
    method: str = DEFAULT_METHOD  # whose `sae/`, `analysis/` and `dashboards/` the paths point at

    @property
    def store_root(self) -> str:
        return normalize_root(self.store)

    @property
    def root(self) -> str:
        return join(self.store_root, "runs", self.run)

    @property
    def methods_root(self) -> str:
        """Folder of the non-default methods' own stages (and the methods comparison)."""
        return join(self.root, "methods")

    def url(self, *parts: str) -> str:
        """A URL under the run; a method's own stage folders under its prefix (module docstring)."""
        if self.method != DEFAULT_METHOD and parts and parts[0].strip("/").split("/", 1)[0] in METHOD_STAGES:
            return join(self.methods_root, self.method, *parts)
        return join(self.root, *parts)

    def stage(self, stage: str) -> str:
        return self.url(stage)

    # -- activations (stage 1)
    def shard(self, index: int) -> str:
        return self.url("activations", f"shard-{index:05d}.parquet")

    @property
    def activations_manifest(self) -> str:
        return self.marker("activations")

    def marker(self, stage: str) -> str:
        """URL of the stage's completion marker (MARKERS)."""
        return self.url(MARKERS[stage])

    # -- analysis (stages 3-4) and dashboards (stage 5)
    def table(self, name: str) -> str:
        """URL (or glob, for partitioned tables) of a table of storage/schemas.py TABLES."""
        return self.url(TABLES[name].path)

    def latent_tokens_part(self, index: int) -> str:
        return self.url("analysis", "latent_tokens", f"part-{index:05d}.parquet")

    def latent_docs_part(self, index: int) -> str:
        return self.url("analysis", "latent_docs", f"part-{index:05d}.parquet")

    def attribution_part(self, table: str, shard: int, tag: str, part: int) -> str:
        """A part of `latent_tokens` or `latent_docs` written by attribution shard `shard` under key `tag`."""
        return self.url("analysis", table, f"shard-{shard:05d}-{tag}-{part:03d}.parquet")

    def attribution_shard(self, shard: int, tag: str | None = None) -> str:
        """An attribution shard's sidecar (`tag` None: its completion marker) or per-token patched-run KLs."""
        name = f"shard-{shard:05d}.json" if tag is None else f"shard-{shard:05d}-{tag}.parquet"
        return self.url("analysis", "attribution_shards", name)

    @property
    def dashboards_dir(self) -> str:
        return self.url("dashboards")

    # -- bookkeeping
    @property
    def prefect_results(self) -> str:
        return self.url(".prefect")

    @property
    def lock(self) -> str:
        return self.url("LOCK")

    def cache_dir(self, *parts: str) -> str:
        """Store-wide cache shared by runs (e.g. the built-in demo pair, keyed by its settings)."""
        return join(self.store_root, "cache", *parts)
