"""Stage 0: the model pair. The built-in planted demo pair is built once per (preset, seed, mix, builder source)
into `<store>/cache/demo_pair/<key>/` and reused by every run on that store; user pairs need no stage.

The pair is named by its URL on the store in every task input (models load through tasks/models.py, which mirrors
an S3 copy into this machine's cache), so nothing machine-local reaches the store or a cache key.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import NamedTuple

from prefect import task

import organisms.demo_corpus
import organisms.demo_pair
import organisms.demo_sources
import organisms.demo_train
from diffsae.config import DataConfig, DemoConfig, ModelsConfig, PipelineConfig
from storage.context import RunContext
from tasks.common import IO_RETRY, STAGE_CACHE, read_marker, stable_hash, write_marker

DONE = "DONE.json"


class DemoPair(NamedTuple):
    """The built-in pair on the store: `url` holds base/, finetuned/, prompts.jsonl, kl_profile.json."""

    key: str
    url: str


def demo_key(demo: DemoConfig) -> str:
    """Preset, seed, mix and the builder's source (organisms/demo_*.py): a changed builder builds a new pair."""
    modules = (organisms.demo_pair, organisms.demo_corpus, organisms.demo_sources, organisms.demo_train)
    src = "".join(inspect.getsource(m) for m in modules)
    return f"{demo.preset}-s{demo.seed}-{demo.mix}-" + stable_hash(demo.model_dump(), src)[:12]


def demo_pair_url(ctx: RunContext, key: str) -> str:
    return ctx.paths.cache_dir("demo_pair", key)


def demo_pair_done(ctx: RunContext, key: str) -> DemoPair | None:
    return read_marker(ctx.store, f"{demo_pair_url(ctx, key)}/{DONE}", key, DemoPair)


def build_pair(ctx: RunContext, demo: DemoConfig, key: str) -> DemoPair:
    """Build the planted pair (≤ 5 min for the demo preset on 2 cores) and publish it on the store."""
    done = demo_pair_done(ctx, key)
    if done is not None:  # complete on the store (its Prefect record was lost): reuse, never rebuild
        return done
    store, url = ctx.store, demo_pair_url(ctx, key)
    store.delete_tree(url)  # an incomplete earlier build
    if ctx.is_s3:
        with tempfile.TemporaryDirectory() as tmp:
            organisms.demo_pair.build_demo_pair(Path(tmp) / "pair", preset=demo.preset, seed=demo.seed, mix=demo.mix)
            store.put_tree(f"{tmp}/pair", url)
    else:
        organisms.demo_pair.build_demo_pair(Path(url), preset=demo.preset, seed=demo.seed, mix=demo.mix)
    out = DemoPair(key, url)
    write_marker(store, f"{url}/{DONE}", out)  # last: marks the pair complete
    return out


@task(name="build-demo-pair", cache_policy=STAGE_CACHE, **IO_RETRY)
def build_demo_pair_task(ctx: RunContext, demo: DemoConfig, key: str) -> DemoPair:
    return build_pair(ctx, demo, key)


def resolved_inputs(cfg: PipelineConfig, pair: DemoPair | None) -> tuple[ModelsConfig, DataConfig]:
    """The models and data a run uses: the config's, or the demo pair's (by store URL) with its held-out prompts."""
    if not cfg.uses_demo_pair:
        assert cfg.data is not None
        return cfg.models, cfg.data
    assert pair is not None
    models = cfg.models.model_copy(update={"base": f"{pair.url}/base", "finetuned": f"{pair.url}/finetuned"})
    return models, DataConfig(path=f"{pair.url}/prompts.jsonl", max_tokens_per_doc=256)
