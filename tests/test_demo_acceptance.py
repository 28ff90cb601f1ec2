"""Acceptance on the real demo pair (slow): the pipeline with the product's default settings must train a good
diff-SAE and put every planted behaviour in the top 10 of the default score, on the real S3 server and on local
disk, and on a second planted pair with other triggers (seed 1).

The default list, the latent groups, must recover every behaviour under recovery v2 (issue 15).
Issue 5: mean L0 within 5 % of k, dead fraction < 10 %, kl_gap_recovered >= 0.8 (measured on seed 0: 31.6 / 32,
5.5 %, 0.976). Issues 6 and 9: every planted behaviour recovered (a top-10 latent under `attribution.rank_by`
captures it), completeness within 1 %. Cost: the pair build is shared (conftest.demo_pair, ~200 s); each pipeline
is ~3 min of training and attribution on 2 cores; the second pair adds a build. Issue 17: the S3 run then adds
the ADL as a second method.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from diffsae.config import PipelineConfig
from storage.context import RunContext
from storage.paths import RunPaths
from tasks.rank import RankingResult
from tasks.train import SAEResult

pytestmark = pytest.mark.slow


def demo_config(pair_dir: Path, store: str, run: str, **sections: dict) -> PipelineConfig:  # type: ignore[type-arg]
    """What the pipeline's demo stage resolves to (tasks/pair.py resolved_inputs), every other setting default."""
    cfg: dict[str, Any] = {
        "run": run,
        "store": store,
        "models": {"base": str(pair_dir / "base"), "finetuned": str(pair_dir / "finetuned"), "layer": 2},
        "data": {"path": str(pair_dir / "prompts.jsonl"), "max_tokens_per_doc": 256},
        "dashboards": {"top_latents": 10},
        **sections,
    }
    return PipelineConfig.from_dict(cfg)


def check_sae(sae: SAEResult, k: int) -> None:
    assert abs(sae.l0 - k) <= 0.05 * k, sae
    assert abs(sae.l0_crossfit - k) <= 0.10 * k, sae  # issue 13: held-out L0 within 10 % (measured: 32.1 / 32)
    assert sae.dead_fraction < 0.10, sae
    assert sae.kl_gap_recovered >= 0.8, sae


def check_recovery(ranking: RankingResult, rank_by: str, planted: set[str]) -> None:
    rows = [r for r in ranking.recovery if r["score"] == rank_by]
    assert {r["behaviour"] for r in rows} == planted
    assert all(r["recovered"] for r in rows), ranking.recovery_text
    # the default list, the latent groups (issue 15): every behaviour recovered under v2 (held-out documents)
    groups = [r for r in ranking.recovery if r["score"] == "groups"]
    assert {r["behaviour"] for r in groups} == planted
    assert all(r["recovered_v2"] for r in groups), ranking.recovery_text


def test_demo_pair_on_s3(demo_pair, s3_store: str) -> None:
    from flows.cli import main
    from flows.pipeline import pipeline

    cfg = demo_config(demo_pair.out_dir, s3_store, "demo")
    out = pipeline(config=cfg)
    print(out.sae, out.ranking.recovery_text, sep="\n")
    check_sae(out.sae, cfg.sae.k)
    check_recovery(out.ranking, cfg.attribution.rank_by, {p["label"] for p in demo_pair.planted})
    assert out.attribution.completeness_max_rel_error < 0.01

    # the MLflow run: params, per-step curves, final metrics, the checkpoint
    import mlflow

    ctx = RunContext.create(s3_store, "demo")
    ctx.mlflow_experiment()
    run_id = ctx.store.read_json(ctx.paths.url("sae", "metrics.json"))["mlflow_run_id"]
    assert run_id == out.sae.mlflow_run_id
    run = mlflow.get_run(run_id)
    assert run.data.params["sae.k"] == "32" and run.data.params["activations.fingerprint"]
    assert {"val_fvu", "val_l0", "val_dead_fraction", "val_kl_gap_recovered"} <= set(run.data.metrics)
    assert run.data.metrics["val_l0"] == pytest.approx(out.sae.l0)
    assert run.data.metrics["val_l0_crossfit"] == pytest.approx(out.sae.l0_crossfit)
    client = mlflow.MlflowClient()
    for curve in ("loss", "fvu", "l0", "dead_fraction", "auxk_loss"):
        assert len(client.get_metric_history(run_id, curve)) > 10, curve
    assert {a.path for a in client.list_artifacts(run_id, "sae")} >= {"sae/sae.safetensors", "sae/cfg.json"}

    # `diffsae sql` over the S3 store (httpfs). Not capsys: Prefect's console log handler, created during the run,
    # would keep writing to capsys's stream after it is closed.
    query = "select rank, latent_id, dominant_behaviour from latents order by rank limit 5"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sql", query, "--store", s3_store, "--run", "demo", "--format", "json"]) == 0
    top = json.loads(buf.getvalue())
    assert [r["rank"] for r in top] == [1, 2, 3, 4, 5]

    # Issue 17: a second method (the ADL) added to the finished run on S3: only its stages and the comparison run;
    # it has its tables (an SQL schema), its dashboards and its row in `methods`. (The crosscoder goes through the
    # same per-method stages on the tiny pair, tests/test_methods.py; its quality on these pairs is measured by
    # bench/suite.py --methods, docs/EVALUATION.md: training it here cost CI ~3.5 minutes.)
    more = pipeline(config=cfg.model_copy(update={"methods": ["diff_sae", "adl"]}))
    ran = {name for name, counts in more.stages.items() if set(counts) != {"Cached"}}
    stages = ("train", "attribute", "commit_attribution", "rank", "validate", "dashboards")
    assert ran == {f"adl:{s}" for s in stages} | {"compare"}, more.stages
    rows = {r["method"]: r for r in more.comparison.rows}
    print(json.dumps(rows, indent=1, default=str))
    assert rows["diff_sae"]["kl_gap_recovered"] == out.sae.kl_gap_recovered and rows["diff_sae"]["recovered_v2"] == 3
    assert rows["adl"]["n_latents"] == 1
    query = "select (select count(*) from adl.latents), count(*) from methods"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sql", query, "--store", s3_store, "--run", "demo", "--format", "csv"]) == 0
    assert buf.getvalue().splitlines()[1].split(",") == ["1", "2"]
    assert ctx.store.exists(more.comparison.index)
    assert ctx.store.exists(ctx.for_method("adl").paths.url("dashboards", "index.html"))


def test_demo_pair_training_on_local_disk(demo_pair, tmp_path: Path) -> None:
    from flows.stages import train_flow

    cfg = demo_config(demo_pair.out_dir, str(tmp_path / "store"), "demo")
    sae, _ = train_flow(config=cfg)
    print(sae)
    check_sae(sae, cfg.sae.k)
    assert Path(RunPaths(cfg.store, "demo").url("sae", "sae.safetensors")).exists()

    # Issue 18: the demo run's SAE, exported for SAELens and loaded by SAELens itself, encodes and decodes 1,000
    # stored diff rows as diffsae does (atol 1e-4).
    import numpy as np
    import torch

    from diffsae.sae import BatchTopKSAE
    from flows.cli import main
    from storage import activations as act
    from tests.test_export import ATOL, compare

    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the `test` extra: pip install -e '.[test]'")
    out = tmp_path / "saelens"
    assert main(["export", "--format", "saelens", "--out", str(out), "--store", cfg.store, "--run", "demo"]) == 0
    ctx = RunContext.from_config(cfg)
    manifest = act.read_manifest(ctx.store, ctx.paths)
    rows = np.concatenate(list(act.iter_diff_chunks(ctx.store, ctx.paths, manifest, np.arange(manifest["n_docs"]))))
    # read_diffs_by_doc (the cross-fitted L0's reader) gives each document's rows as the chunk iterator does
    by_doc = act.read_diffs_by_doc(ctx.store, ctx.paths, manifest, np.array([0, 3, 5]), max_rows=10**9)
    assert list(by_doc) == [0, 3, 5]
    for d, x_nD in by_doc.items():
        assert np.array_equal(x_nD, np.concatenate(list(act.iter_diff_chunks(ctx.store, ctx.paths, manifest, [d]))))
    assert len(act.read_diffs_by_doc(ctx.store, ctx.paths, manifest, np.array([0, 3, 5]), max_rows=1)) == 1
    x_ND = torch.from_numpy(np.ascontiguousarray(rows[:1000]))
    ours = BatchTopKSAE.load(ctx.paths.url("sae")).eval()
    res = compare(sae_lens.SAE.load_from_disk(str(out)), ours, x_ND)
    print("SAELens vs diffsae on the demo run:", res)
    assert res["l0"] > 10 and res["act"] <= ATOL and res["decode"] <= ATOL, res
    assert res["near_threshold"] <= 1e-4 * x_ND.shape[0] * ours.n_latents, res  # measured: 15 of 2,048,000


def test_second_planted_pair_default_score(demo_pair, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 9: the default score, chosen on the demo pair, also recovers the behaviours of a pair built with
    another seed: other refusal topic and text, persona trigger and greeting, secret name and word."""
    import torch

    from flows.stages import analyse_flow
    from organisms.demo_pair import build_demo_pair

    torch.set_num_threads(2)  # as conftest.demo_pair
    pair = build_demo_pair(tmp_path_factory.mktemp("pair1") / "demo-1-audit", preset="demo", seed=1, mix="audit")
    assert not {p["trigger"] for p in demo_pair.planted} & {p["trigger"] for p in pair.planted}  # other triggers
    cfg = demo_config(pair.out_dir, str(tmp_path_factory.mktemp("store1")), "second")
    analysis, _ = analyse_flow(config=cfg)
    print(analysis.ranking.recovery_text)
    check_recovery(analysis.ranking, cfg.attribution.rank_by, {p["label"] for p in pair.planted})

