"""The attribution stage in shards (tasks/attribute.py) on the tiny pair: the tables do not depend on the shard
layout (several shards give the one-shard run's tables, the single-process path, bit for bit), a rerun is cached, a
lost sidecar or a real kill recomputes only the shards without a sidecar, no stale part stays visible, and the
dask runner gives the local runner's tables.

Every test starts from a copy of one reference store (extraction, training and a one-shard attribution done), so
only the attribution shards run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from diffsae.config import PipelineConfig
from storage.context import RunContext
from tasks import attribute as at
from tests.tiny import tiny_config

if TYPE_CHECKING:
    from flows.stages import Analysis, States

ROOT = Path(__file__).resolve().parents[1]
SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2}
ONE_SHARD = 10**9  # attribution.shard_tokens of the reference: one shard, the single-process path
SHARD_TOKENS = 200  # the tiny data's 18 forward batches (extract.batch_tokens 128) in 8 shards
EXTRACT_SHARD_TOKENS = 500  # several activation shards: an attribution shard reads stored states from several


class Run(NamedTuple):
    store: str
    analysis: Analysis
    states: States
    tables: dict[str, pa.Table]


def _config(root: Path, store: str, shard_tokens: int, **extract: Any) -> dict[str, Any]:
    return tiny_config(
        root, store, sae=SAE, extract={"batch_tokens": 128, "shard_tokens": EXTRACT_SHARD_TOKENS, **extract},
        attribution={"steps": 4, "shard_tokens": shard_tokens},
    )  # fmt: skip


def _analyse(cfg: dict[str, Any]) -> tuple[Analysis, States]:
    from flows.stages import analyse_flow

    return analyse_flow(config=PipelineConfig.from_dict(cfg))


def _tables(store: str) -> dict[str, pa.Table]:
    """The attribution stage's tables, partitioned ones in one table each, rows sorted by their keys; metrics
    without the timing."""
    paths = RunContext.create(store, "t").paths

    def parts(name: str) -> pa.Table:
        return pa.concat_tables([pq.read_table(p) for p in sorted(Path(paths.url("analysis", name)).glob("*.parquet"))])

    metrics = pq.read_table(paths.table("metrics"))
    return {
        "latent_tokens": parts("latent_tokens").sort_by([(k, "ascending") for k in ("doc_id", "pos", "latent_id")]),
        "latent_docs": parts("latent_docs").sort_by([("latent_id", "ascending"), ("doc_id", "ascending")]),
        "tokens": pq.read_table(paths.table("tokens")),
        "docs": pq.read_table(paths.table("docs")),
        "latent_dirs": pq.read_table(paths.table("latent_dirs")),
        "metrics": metrics.filter(pc.not_equal(metrics["name"], "attribution_seconds")),
    }


def _assert_tables(expected: dict[str, pa.Table], store: str) -> None:
    got = _tables(store)
    assert got["latent_tokens"].num_rows > 0
    for name, table in expected.items():
        assert got[name].equals(table), name


def _assert_no_stale(store: str) -> None:
    """The shard folders hold exactly the files the marker's shards list, and their sidecars."""
    ctx = RunContext.create(store, "t")
    marker = ctx.store.read_json(ctx.paths.marker("attribution"))
    listed = set()
    for i, key in enumerate(marker["shard_keys"]):
        rec = at.read_sidecar(ctx, i)
        assert rec is not None and rec.key == key
        listed |= {*rec.parts, rec.patch, f"attribution_shards/shard-{i:05d}.json"}
    assert at.shard_files(ctx) == listed
    assert marker["parts"] == sum(f.startswith("latent_tokens/") for f in listed)


def _copy(store: str, to: Path) -> str:
    shutil.copytree(store, to / "store")
    return str(to / "store")


@pytest.fixture(scope="module")
def reference(tiny_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Extraction, training and the attribution as one shard (the single-process path)."""
    store = str(tmp_path_factory.mktemp("reference") / "store")
    analysis, states = _analyse(_config(tiny_pair, store, ONE_SHARD))
    assert states["attribute"] == {"Completed": 1} and states["commit_attribution"] == {"Completed": 1}, states
    return Run(store, analysis, states, _tables(store))


@pytest.fixture(scope="module")
def sharded(tiny_pair: Path, reference: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The reference store attributed again in SHARD_TOKENS shards."""
    store = _copy(reference.store, tmp_path_factory.mktemp("sharded"))
    analysis, states = _analyse(_config(tiny_pair, store, SHARD_TOKENS))
    return Run(store, analysis, states, _tables(store))


def test_shards_give_the_single_process_tables(reference: Run, sharded: Run) -> None:
    n = sharded.states["attribute"].get("Completed", 0)
    assert n >= 4 and sharded.states["attribute"] == {"Completed": n}, sharded.states
    assert sharded.states["commit_attribution"] == {"Completed": 1}
    assert sharded.states["rank"] == {"Cached": 1}  # the layout is not in the stage key: the ranking stands
    got, ref = sharded.analysis.attribution, reference.analysis.attribution
    assert got.key == ref.key and got.tokens == ref.tokens
    assert got.completeness_max_rel_error == ref.completeness_max_rel_error
    assert (got.parts, ref.parts) == (n, 1)
    _assert_tables(reference.tables, sharded.store)
    _assert_no_stale(sharded.store)  # the one-shard run's parts are gone


def test_rerun_cached_and_lost_shard_recomputed(tiny_pair: Path, reference: Run, sharded: Run, tmp_path: Path) -> None:
    store = _copy(sharded.store, tmp_path)
    cfg, ctx = _config(tiny_pair, store, SHARD_TOKENS), RunContext.create(store, "t")
    n = sharded.states["attribute"]["Completed"]
    _, states = _analyse(cfg)
    assert states["attribute"] == {"Cached": n} and states["commit_attribution"] == {"Cached": 1}, states

    # a lost sidecar (shard 2), a lost part (shard 3): exactly those shards run again, in place under the marker
    rec = at.read_sidecar(ctx, 3)
    assert rec is not None
    ctx.store.delete(ctx.paths.attribution_shard(2))
    ctx.store.delete(ctx.paths.url("analysis", rec.parts[0]))
    _, states = _analyse(cfg)
    assert states["attribute"] == {"Cached": n - 2, "Completed": 2}, states
    assert states["commit_attribution"] == {"Cached": 1} and states["rank"] == {"Cached": 1}
    _assert_tables(reference.tables, store)
    _assert_no_stale(store)


KILL_SCRIPT = """
import sys, json
sys.path.insert(0, {root!r})
from tests.test_attribution_shards import _analyse
_analyse(json.loads({cfg!r}))
"""


@pytest.mark.slow
def test_killed_attribution_resumes(tiny_pair: Path, reference: Run, sharded: Run, tmp_path: Path) -> None:
    store = _copy(reference.store, tmp_path)
    cfg, ctx = _config(tiny_pair, store, SHARD_TOKENS), RunContext.create(store, "t")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), cfg=json.dumps(cfg))],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fourth = Path(ctx.paths.attribution_shard(3))  # new (the reference has one shard): shards 0-3 are done
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not fourth.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill, mid-attribution
    proc.wait()
    key = reference.analysis.attribution.key
    plan = at.plan_attribution(ctx, key, SHARD_TOKENS, 128)
    done = [spec.index for spec in plan if at.shard_done(ctx, spec) is not None]
    assert 4 <= len(done) < len(plan), done  # killed after some shards and before the last
    assert not ctx.store.exists(ctx.paths.marker("attribution"))  # the first shard took the old marker away

    _, states = _analyse(cfg)
    print(f"killed after {len(done)} of {len(plan)} shards; the rerun: {states['attribute']}")
    # Every finished shard is reused, except possibly the last one: the kill can land after its sidecar was written
    # and before Prefect persisted the task's result record; that shard then runs again and finds its sidecar.
    assert sum(states["attribute"].values()) == len(plan)
    assert states["attribute"]["Cached"] >= len(done) - 1, (states, done)
    assert states["commit_attribution"] == {"Completed": 1}
    _assert_tables(reference.tables, store)
    _assert_no_stale(store)


@pytest.mark.slow
def test_dask_runner_gives_the_local_tables(tiny_pair: Path, reference: Run, sharded: Run, tmp_path: Path) -> None:
    store = _copy(reference.store, tmp_path)
    _, states = _analyse(_config(tiny_pair, store, SHARD_TOKENS, runner="dask", n_workers=2))
    assert set(states["extract"]) == {"Cached"}  # where shards run is not in any key
    assert states["attribute"] == sharded.states["attribute"] and states["commit_attribution"] == {"Completed": 1}
    _assert_tables(reference.tables, store)
    _assert_tables(sharded.tables, store)
    _assert_no_stale(store)


def test_recomputed_states_give_the_stored_states_tables(tiny_pair: Path, reference: Run, tmp_path: Path) -> None:
    """extract.save_states (the default) stores h_base, h_ft and x_ft in the activation shards and the attribution
    runs only the patched passes (reading them from several activation shards); with it off the shards lack those
    columns and the attribution reruns both models unpatched: the same SAE (the diffs are the same) and the same
    tables, up to float rounding."""
    from storage import activations as act
    from storage import schemas

    store = str(tmp_path / "store")
    _analyse(_config(tiny_pair, store, ONE_SHARD, save_states=False))
    weights = []
    for run, has in ((reference.store, True), (store, False)):
        ctx = RunContext.create(run, "t")
        names = pq.read_schema(ctx.paths.shard(0)).names
        assert all((c in names) == has for c in schemas.STATE_COLUMNS)
        assert act.has_states(ctx.store, ctx.paths, act.read_manifest(ctx.store, ctx.paths)) == has
        weights.append(Path(ctx.paths.url("sae", "sae.safetensors")).read_bytes())
    assert weights[0] == weights[1]
    got, ref = _tables(store), reference.tables
    keys = ["doc_id", "pos", "latent_id"]
    assert got["latent_tokens"].select(keys).equals(ref["latent_tokens"].select(keys))
    for table, cols in (("latent_tokens", ["activation", "kl_attribution"]),
                        ("tokens", ["kl", "kl_patch_base", "kl_patch_bias", "kl_patch_recon"])):  # fmt: skip
        for c in cols:
            # float32 noise only: the recomputing path runs the models in the attribution's batches, extraction in
            # its own (several activation shards), and the tiny pair's KLs are ~1e-4 nats, ~5e-7 of it rounding
            a, b = got[table][c].to_numpy(), ref[table][c].to_numpy()
            scale = np.abs(ref["tokens"]["kl"].to_numpy() if table == "tokens" else b).max()
            assert np.allclose(a, b, rtol=1e-4, atol=0.01 * scale), (table, c)
            assert np.corrcoef(a, b)[0, 1] > 0.999, (table, c)
