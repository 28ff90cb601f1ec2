"""The validation stage in the pipeline, on the tiny pair: its tables (the default list's entries, latent groups, or
single latents), its MLflow metrics, the group and latent pages and the end-of-run report; a rerun is cached, a
changed `validation.top` or `validation.entries` reruns it (and the dashboards, not the ranking), `validation.top:
0` skips it (marker, no table)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffsae.config import PipelineConfig
from flows.pipeline import PipelineResult
from storage.context import RunContext
from storage.paths import RunPaths
from tests.tiny import tiny_config

SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2}
VALIDATION = {"top": 3, "n_docs": 4, "n_prompts": 2, "max_new_tokens": 4, "scales": [0, 2]}


def _run(root: Path, store: str, **validation: object) -> PipelineResult:
    from flows.pipeline import pipeline

    cfg = tiny_config(root, store, sae=SAE, attribution={"steps": 2}, validation={**VALIDATION, **validation})
    return pipeline(config=PipelineConfig.from_dict(cfg))


def _states(out: PipelineResult) -> dict[str, str]:
    return {k: "+".join(sorted(v)) for k, v in out.stages.items()}


@pytest.mark.slow
def test_validation_stage(tiny_pair: Path, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    store = str(tmp_path / "store")
    paths = RunPaths(store, "t")
    first = _run(tiny_pair, store)
    assert _states(first)["validate"] == "Completed" and first.validation.n_entries == 3
    table = pq.read_table(paths.table("validation")).to_pylist()
    groups = first.ranking.groups[:3]
    assert [r["latent_id"] for r in table] == [g["group_id"] for g in groups]
    assert [r["rank"] for r in table] == [1, 2, 3]
    for r, g in zip(table, groups):
        assert r["entry"] == "group" and r["members"][: len(g["members"])] == g["members"]
        assert len(r["members"]) == g["n_members"] and r["members"][0] == r["latent_id"]
        assert r["steering_scales"] == [0.0, 2.0] and len(r["steering_nll"]) == 2 and r["n_prompts"] >= 1
        assert r["best_steering_scale"] in (0.0, 2.0) and 0 <= r["generations_changed"] <= 1
        assert r["kl_removed_on_firing"] <= 1 and r["n_firing_tokens"] > 0
    gens = pq.read_table(paths.table("validation_generations")).to_pylist()
    assert {g["variant"] for g in gens} == {"base", "base+steer", "finetuned", "finetuned-ablated"}
    assert len(gens) == 4 * sum(r["n_prompts"] for r in table)
    assert all(g["prompt"].endswith("<|assistant|>") or "<|assistant|>" not in g["prompt"] for g in gens)

    group_page = Path(paths.dashboards_dir, "groups", f"{table[0]['latent_id']}.html").read_text()
    assert "Causal validation" in group_page and "finetuned &minus; ablation" in group_page
    assert "each member's" in group_page
    leader_page = Path(paths.dashboards_dir, "latents", f"{table[0]['latent_id']}.html").read_text()
    assert "Causal validation" not in leader_page  # the group's figures are not the leader's own
    assert "validation" in RunContext.create(store, "t").duck().execute("SHOW TABLES").fetchnumpy()["name"]

    import mlflow

    ctx = RunContext.create(store, "t")
    ctx.mlflow_experiment()
    run_id = ctx.store.read_json(paths.marker("sae"))["mlflow_run_id"]
    assert mlflow.get_run(run_id).data.metrics["validation.n_entries"] == 3.0

    from flows.cli import report

    text = report(PipelineConfig.from_dict(tiny_config(tiny_pair, store)), first)
    assert "causal validation of the top latent groups" in text and text.count("finetuned: ") == 3
    ranks = [r["latent_id"] for r in first.ranking.top[:3]]
    assert first.ranking.groups and first.ranking.groups[0]["group_id"] == ranks[0]  # the best latent leads group 1
    assert text.index("top latent groups (the default list") < text.index("top latents by")

    again = _run(tiny_pair, store)
    assert _states(again)["validate"] == "Cached" and _states(again)["dashboards"] == "Cached"
    assert again.validation == first.validation

    single = _run(tiny_pair, store, entries="latents")
    st = _states(single)
    assert st["rank"] == "Cached" and st["validate"] == "Completed" and st["dashboards"] == "Completed", st
    table = pq.read_table(paths.table("validation")).to_pylist()
    assert [r["latent_id"] for r in table] == ranks and [r["rank"] for r in table] == [1, 2, 3]
    assert all(r["entry"] == "latent" and r["members"] == [r["latent_id"]] for r in table)
    page = Path(paths.dashboards_dir, "latents", f"{ranks[0]}.html").read_text()
    assert "Causal validation" in page and "each member's" not in page
    assert "Causal validation" not in Path(paths.dashboards_dir, "groups", f"{ranks[0]}.html").read_text()
    text = report(PipelineConfig.from_dict(tiny_config(tiny_pair, store)), single)
    assert "causal validation of the top latents" in text

    fewer = _run(tiny_pair, store, top=2)
    st = _states(fewer)
    assert st["rank"] == "Cached" and st["validate"] == "Completed" and st["dashboards"] == "Completed", st
    assert pq.read_table(paths.table("validation")).num_rows == 2

    skipped = _run(tiny_pair, store, top=0)
    assert _states(skipped)["validate"] == "Completed" and skipped.validation.n_entries == 0
    assert not ctx.store.exists(paths.table("validation"))
    assert not ctx.store.exists(paths.table("validation_generations"))
    assert "Causal validation" not in Path(paths.dashboards_dir, "latents", f"{ranks[0]}.html").read_text()
    assert "causal validation" not in report(PipelineConfig.from_dict(tiny_config(tiny_pair, store)), skipped)
