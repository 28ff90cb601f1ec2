"""The embedded default: with no `models`, the pipeline builds the planted pair once per store (here the `small`
preset on the real S3 server, mirrored locally for transformers) and reuses it on the next run."""

from __future__ import annotations

import json

import pytest

from diffsae.config import PipelineConfig, local_cache_dir
from storage.context import RunContext


@pytest.mark.slow
def test_demo_pair_stage_on_s3(s3_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import pipeline

    settings = {
        "run": "demo-small", "store": s3_store, "demo": {"preset": "small"},
        "sae": {"n_latents": 128, "k": 8, "batch_size": 256, "epochs": 2, "min_tokens": 0}, "attribution": {"steps": 2},
        "dashboards": {"top_latents": 5},
    }
    cfg = PipelineConfig.from_dict(settings)
    out = pipeline(config=cfg)
    assert out.stages["demo_pair"] == {"Completed": 1}
    assert set(out.stages["extract"]) == set(out.stages["attribute"]) == {"Completed"}  # shard tasks
    assert all(v == {"Completed": 1} for k, v in out.stages.items() if k not in ("extract", "attribute", "demo_pair"))
    ctx = RunContext.from_config(cfg)
    store = ctx.store
    pairs = store.glob(ctx.paths.cache_dir("demo_pair", "*"))
    assert len(pairs) == 1
    for name in ("DONE.json", "prompts.jsonl", "base/config.json", "finetuned/model.safetensors"):
        assert store.exists(f"{pairs[0]}/{name}"), name
    # the models and prompts are named by their URL on the store: no local mirror path reaches a task or the store
    manifest = store.read_json(ctx.paths.activations_manifest)
    pair = ctx.portable(pairs[0])
    assert manifest["base"] == f"{pair}/base" and manifest["data"]["path"] == f"{pair}/prompts.jsonl"
    assert str(local_cache_dir()) not in json.dumps(manifest)
    # the run's docs carry the planted labels, so recovery was evaluated
    assert {r["behaviour"] for r in out.ranking.recovery} >= {"refusal", "persona"}
    again = pipeline(config=cfg)
    assert all(set(v) == {"Cached"} for v in again.stages.values()), again.stages

    # another run on the same store reuses the pair: its cache record is store-wide (under cache/.prefect)
    def rebuild(*args, **kwargs):
        raise AssertionError("the demo pair was rebuilt")

    monkeypatch.setattr("organisms.demo_pair.build_demo_pair", rebuild)
    other = pipeline(config=PipelineConfig.from_dict({**settings, "run": "demo-small-2"}))
    assert other.stages["demo_pair"] == {"Cached": 1}
    assert other.stages["train"] == {"Completed": 1}
    # with that record gone, the task still reuses the complete pair on the store instead of rebuilding it
    store.delete_tree(ctx.paths.cache_dir(".prefect"))
    third = pipeline(config=PipelineConfig.from_dict({**settings, "run": "demo-small-3"}))
    assert third.stages["demo_pair"] == {"Completed": 1}
