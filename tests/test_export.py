"""`diffsae export`: the SAELens folder loads in SAELens itself and encodes/decodes stored diff rows exactly as
diffsae does; an export without the input scale folded in is caught by the same comparison; the Neuronpedia batch
files validate against exports/neuronpedia.schema.json and agree with the run's tables.

SAELens comes from the `test` extra (pyproject.toml); without it the SAELens checks are skipped (`-ra` says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffsae.sae import BatchTopKSAE
from exports.common import RunInfo, hook_name, resolve_location
from exports.saelens import TENSOR_SHAPES, saelens_tensors, write_saelens_dir
from flows.cli import main
from storage.context import RunContext
from tests.finished_run import SAE, FinishedRun, build_finished_run

torch.set_num_threads(1)
ATOL = 1e-4
BOUNDARY = 1e-5  # pre-activations this close to the threshold may flip under float32 reordering: not compared


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_pair: Path) -> FinishedRun:
    return build_finished_run(tmp_path_factory, tiny_pair)


def _sae_lens() -> Any:
    return pytest.importorskip("sae_lens", reason="SAELens is in the `test` extra: pip install -e '.[test]'")


def compare(sl_sae: Any, sae: BatchTopKSAE, x_ND: torch.Tensor) -> dict[str, float]:
    """Largest differences between SAELens's and diffsae's encode and decode on raw diff rows `x_ND`
    (activations compared away from the threshold; decode compared on the same codes)."""
    with torch.no_grad():
        want_NF, got_NF = sae.encode(x_ND), sl_sae.encode(x_ND)
        near_NF = (sae.pre_acts(x_ND) - sae.threshold.clamp_min(0.0)).abs() < BOUNDARY
        act = (want_NF - got_NF).abs().masked_fill(near_NF, 0.0).max().item()
        dec = (sae.decode(want_NF) - sl_sae.decode(want_NF)).abs().max().item()
        fired = float((want_NF > 0).float().sum(1).mean())
    return {"act": act, "decode": dec, "near_threshold": int(near_NF.sum()), "l0": fired}


def _random_sae(scale: float) -> BatchTopKSAE:
    sae = BatchTopKSAE(16, 32, 4, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec_D.copy_(0.3 * torch.randn(16, generator=gen))
        sae.b_enc_F.copy_(0.1 * torch.randn(32, generator=gen))
        sae.threshold.fill_(0.05)
        sae.scale.fill_(scale)
    return sae.eval()


def _info() -> RunInfo:
    return RunInfo("r", "/store", "base-m", "ft-m", 3, hook_name(3), 128, "/store/p.jsonl", 10, 500, "fp",
                   {"sae_config": {}}, {"fvu": 0.1, "l0": 4.0}, "mean")  # fmt: skip


def test_saelens_layout_and_unfolded_scale_is_caught(tmp_path: Path) -> None:
    """Unit level: names/shapes as SAELens expects; folding `scale` is what makes SAELens agree with diffsae."""
    sl = _sae_lens()
    from safetensors.torch import load_file

    sae = _random_sae(scale=0.05)
    x_ND = 20.0 * torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    good = write_saelens_dir(sae, _info(), tmp_path / "good")
    tensors = load_file(str(tmp_path / "good" / "sae_weights.safetensors"))
    dims = {"d_in": 16, "d_sae": 32}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        k: tuple(dims[d] for d in shape) for k, shape in TENSOR_SHAPES.items()
    }
    assert torch.equal(tensors["threshold"], torch.full((32,), 0.05))
    cfg = json.loads((tmp_path / "good" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert good.d_sae == 32 and (tmp_path / "good" / "README.md").read_text().count("difference") >= 1

    ok = compare(sl.SAE.load_from_disk(str(tmp_path / "good")), sae, x_ND)
    assert ok["l0"] > 0.5 and ok["act"] <= ATOL and ok["decode"] <= ATOL, ok

    write_saelens_dir(sae, _info(), tmp_path / "unfolded", fold_scale=False)
    bad = compare(sl.SAE.load_from_disk(str(tmp_path / "unfolded")), sae, x_ND)
    assert bad["act"] > 100 * ATOL and bad["decode"] > 100 * ATOL, bad
    # the same check without SAELens: the folded tensors reproduce diffsae's pre-activations
    t = saelens_tensors(sae)
    with torch.no_grad():
        pre = (x_ND - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        assert torch.allclose(pre, sae.pre_acts(x_ND), atol=1e-5)


def _diff_rows(finished: FinishedRun, n: int) -> torch.Tensor:
    from storage import activations as act

    ctx = RunContext.create(finished.store, finished.run)
    manifest = act.read_manifest(ctx.store, ctx.paths)
    assert manifest is not None
    chunks = act.iter_diff_chunks(ctx.store, ctx.paths, manifest, np.arange(int(manifest["n_docs"])))
    rows = np.concatenate(list(chunks))
    assert len(rows) >= n, len(rows)
    return torch.from_numpy(np.ascontiguousarray(rows[:n]))


@pytest.mark.slow
def test_saelens_export_of_a_run_matches_diffsae(finished: FinishedRun, tmp_path: Path) -> None:
    sl = _sae_lens()
    out = tmp_path / "saelens"
    assert main(["export", "--format", "saelens", "--out", str(out), "--store", finished.store,
                 "--run", finished.run]) == 0  # fmt: skip
    loaded = sl.SAE.load_from_disk(str(out))
    assert type(loaded).__name__ == "JumpReLUSAE"
    sae = BatchTopKSAE.load(Path(finished.store) / "runs" / finished.run / "sae").eval()
    assert sae.n_latents == SAE["n_latents"] and abs(float(sae.scale) - 1.0) > 1e-3  # the fold matters here

    x_ND = _diff_rows(finished, 1000)
    res = compare(loaded, sae, x_ND)
    assert res["l0"] > 0.5 and res["act"] <= ATOL and res["decode"] <= ATOL, res
    assert res["near_threshold"] <= 5, res

    md = loaded.cfg.metadata
    manifest = json.loads((Path(finished.store) / "runs" / finished.run / "activations" / "manifest.json").read_text())
    assert md.hook_name == "blocks.1.hook_resid_post" and md.input == "diff" and md.context_size == 64
    assert md.activations_fingerprint == manifest["fingerprint"] and md.diffsae_run == finished.run
    base, ft = (
        resolve_location(RunContext.create(finished.store, finished.run), manifest[k]) for k in ("base", "finetuned")
    )
    assert md.base_model_name == base and md.model_name == md.finetuned_model_name == ft
    assert "finetuned − base" in (out / "README.md").read_text()


def _schema_validator() -> Any:
    import jsonschema

    from exports.neuronpedia import load_schema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.slow
def test_neuronpedia_export_validates_and_matches_tables(finished: FinishedRun, tmp_path: Path) -> None:
    out = tmp_path / "np"
    assert main(["export", "--format", "neuronpedia", "--out", str(out), "--store", finished.store,
                 "--run", finished.run, "--features-per-batch", "10", "--contexts", "5"]) == 0  # fmt: skip
    validator = _schema_validator()
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    features = []
    for f in files:
        batch = json.loads(f.read_text())
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(batch)]
        assert not errors, errors[:5]
        assert len(batch["features"]) <= 10 and batch["layer"] == 1
        features += batch["features"]

    con = RunContext.create(finished.store, finished.run).duck()
    latents = con.execute(
        "SELECT latent_id, rank, frequency, (SELECT count(*) FROM latent_tokens AS t WHERE t.latent_id = l.latent_id)"
        " FROM latents AS l ORDER BY rank, latent_id"
    ).fetchall()  # the histogram counts every firing; frequency (latents) only those on the scored roles' tokens
    assert [(f["feature_index"], f["diffsae"]["rank"]) for f in features] == [(r[0], r[1]) for r in latents]
    for f, (_lid, _rank, freq, n_firing) in zip(features, latents):
        assert f["frac_nonzero"] == pytest.approx(freq, rel=1e-5)
        assert sum(f["freq_hist_data_bar_heights"]) == n_firing
        assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"])
        assert 1 <= len(f["activations"]) <= 5
        for a in f["activations"]:
            ev = a["diffsae"]
            n = len(a["tokens"])
            assert n == len(a["values"]) == len(ev["kl_attribution"]) == len(ev["kl"]) == len(ev["positions"])
            assert a["values"][a["qualifying_token_index"]] == max(a["values"]) > 0

    # one context, token by token, against latent_tokens and tokens
    f = features[0]
    a = f["activations"][0]
    ev = a["diffsae"]
    rows = dict(((p, (act, attr)) for p, act, attr in con.execute(
        "SELECT pos, activation, kl_attribution FROM latent_tokens WHERE latent_id = ? AND doc_id = ?",
        [f["feature_index"], ev["doc_id"]]).fetchall()))  # fmt: skip
    for pos, value, attr in zip(ev["positions"], a["values"], ev["kl_attribution"]):
        act, want_attr = rows.get(pos, (0.0, 0.0))
        assert value == pytest.approx(act, rel=1e-5, abs=1e-7) and attr == pytest.approx(want_attr, rel=1e-5, abs=1e-9)
    toks = con.execute("SELECT pos, token FROM tokens WHERE doc_id = ? ORDER BY pos", [ev["doc_id"]]).fetchall()
    assert a["tokens"] == [t for p, t in toks if p in set(ev["positions"])]

    # --top limits to the first latents by rank, and a re-export leaves no stale batch file behind
    assert main(["export", "--format", "neuronpedia", "--out", str(out), "--store", finished.store,
                 "--run", finished.run, "--top", "3"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("batch-*.json")) == ["batch-0.json"]
    only = json.loads((out / "batch-0.json").read_text())["features"]
    assert [x["feature_index"] for x in only] == [r[0] for r in latents[:3]]


def test_schema_rejects_a_broken_batch(tmp_path: Path) -> None:
    """The schema is strict where the importer is: a feature without `activations` or with a bad type fails."""
    validator = _schema_validator()
    feature: dict[str, Any] = json.loads(json.dumps(_minimal_feature()))
    header = {"run": "r", "input": "diff", "diff": "h_finetuned - h_base", "hook_name": "blocks.1.hook_resid_post",
              "base_model": "b", "finetuned_model": "m", "activations_fingerprint": "f", "rank_by": "mean"}  # fmt: skip
    batch = {"model_id": "m", "layer": 1, "sae_set": "s", "sae_id_suffix": None, "features": [feature],
             "diffsae": header}  # fmt: skip
    assert not list(validator.iter_errors(batch))
    del feature["activations"]
    assert list(validator.iter_errors(batch))
    feature["activations"] = []
    feature["frac_nonzero"] = "often"
    assert list(validator.iter_errors(batch))


def _minimal_feature() -> dict[str, Any]:
    from exports.neuronpedia import EMPTY_LIST_FIELDS

    stats = {k: 0 for k in ("n_active", "n_docs")} | {k: 0.0 for k in ("frequency", "mean_activation",
             "max_activation", "kl_attr_sum", "kl_attr_mean", "kl_attr_max", "pos_mass")}  # fmt: skip
    return {"feature_index": 0, **{k: [] for k in EMPTY_LIST_FIELDS}, "pos_str": [], "neg_str": [],
            "frac_nonzero": 0.0, "freq_hist_data_bar_values": [], "freq_hist_data_bar_heights": [],
            "n_prompts_total": 1, "n_tokens_in_prompt": 1, "dataset": "d", "activations": [],
            "diffsae": {"rank": 1, "rank_by": "mean", "scores": {}, "ranks": {}, "dominant_behaviour": None,
                        "dominant_share": None, **stats}}  # fmt: skip


def test_store_locations_are_resolved() -> None:
    """The manifest records what lies on the store as `<store>/...`; exports name it by this store's URL."""
    ctx = RunContext.create("s3://bucket/team", "r")
    assert resolve_location(ctx, "<store>/cache/demo_pair/k/base") == "s3://bucket/team/cache/demo_pair/k/base"
    assert resolve_location(ctx, "google/gemma-2-2b") == "google/gemma-2-2b"
