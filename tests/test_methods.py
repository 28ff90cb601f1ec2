"""Methods side by side (issue 17): the one-direction dictionary by hand, every method's dictionary saved and loaded
back as the same SAELike, the store layout per method, and a run of the three methods on the tiny pair where adding
methods to a finished run recomputes only theirs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import duckdb
import pytest
import torch

from diffsae import crosscoder as xc
from diffsae.config import ConfigError, PipelineConfig
from diffsae.methods import DirectionDict, encode_tokens, load_dictionary
from diffsae.sae import BatchTopKSAE
from storage.context import RunContext
from storage.paths import RunPaths
from tests.tiny import tiny_config


def test_direction_dict_by_hand(tmp_path: Path) -> None:
    dd = DirectionDict(torch.tensor([[3.0, 4.0]]))  # unit direction (0.6, 0.8)
    diff = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.0, 0.0]])
    acts = dd.encode(diff)  # <diff, d> = 2.2, -1.4 -> 0, 0
    assert torch.allclose(acts, torch.tensor([[2.2], [0.0], [0.0]]))
    assert torch.allclose(dd.decode(acts), torch.tensor([[1.32, 1.76], [0.0, 0.0], [0.0, 0.0]]))
    assert float(dd.b_dec_D.abs().sum()) == 0.0 and float(dd.scale) == 1.0
    dd.save(tmp_path / "adl", metadata={"method": "adl"})
    back = load_dictionary(tmp_path / "adl")
    assert isinstance(back, DirectionDict) and back.metadata["method"] == "adl"
    assert torch.equal(back.W_dec_FD, dd.W_dec_FD)
    with pytest.raises(ValueError, match="norm 0"):
        DirectionDict(torch.zeros(1, 2))


def test_every_dictionary_loads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    h_base, h_ft = torch.randn(50, 8), torch.randn(50, 8)
    sae = BatchTopKSAE(8, 16, 2, seed=1)
    sae.save(tmp_path / "sae")
    cc = xc.CrossCoder(8, 16, 2, seed=2)
    with torch.no_grad():
        cc.b_enc_F.fill_(0.1)
        cc.scale_M.copy_(torch.tensor([0.5, 2.0]))
        cc.threshold.fill_(0.05)
    cc.save(tmp_path / "cc", metadata={"method": "crosscoder"})
    got_sae, got_cc = load_dictionary(tmp_path / "sae"), load_dictionary(tmp_path / "cc")
    assert isinstance(got_sae, BatchTopKSAE) and isinstance(got_cc, xc.DiffView)
    assert torch.equal(encode_tokens(got_sae, h_ft, h_base), sae.encode(h_ft - h_base))
    pair = torch.stack([h_base, h_ft], dim=1)
    assert torch.equal(encode_tokens(got_cc, h_ft, h_base), cc.encode(pair))
    assert torch.equal(got_cc.W_dec_FD, cc.diff_directions_FD())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text('{"architecture": "jumprelu"}')
    with pytest.raises(ValueError, match="unknown architecture 'jumprelu'"):
        load_dictionary(tmp_path / "bad")


def test_method_paths() -> None:
    main, cc = RunPaths("s3://b/x", "r"), RunPaths("s3://b/x", "r", "crosscoder")
    assert main.table("latents") == "s3://b/x/runs/r/analysis/latents.parquet"
    assert cc.table("latents") == "s3://b/x/runs/r/methods/crosscoder/analysis/latents.parquet"
    assert cc.marker("sae") == "s3://b/x/runs/r/methods/crosscoder/sae/metrics.json"
    assert cc.dashboards_dir == "s3://b/x/runs/r/methods/crosscoder/dashboards"
    for shared in ("activations", "methods", "LOCK", ".prefect"):  # one copy per run, whatever the method
        assert cc.url(shared) == main.url(shared)
    assert cc.shard(0) == main.shard(0) and cc.table("methods") == main.table("methods")
    assert RunContext.create("/tmp/s", "r").for_method("adl").paths.method == "adl"


def test_methods_config_errors() -> None:
    with pytest.raises(ConfigError, match="methods.0: Input should be 'diff_sae', 'crosscoder' or 'adl'"):
        PipelineConfig.from_dict({"methods": ["pca"]})
    with pytest.raises(ConfigError, match="methods must not repeat"):
        PipelineConfig.from_dict({"methods": ["adl", "adl"]})
    with pytest.raises(ConfigError, match="methods: List should have at least 1 item"):
        PipelineConfig.from_dict({"methods": []})


@pytest.mark.slow
def test_three_methods_on_the_tiny_pair(tiny_pair: Path, tmp_path: Path) -> None:
    from flows.cli import main as cli_main
    from flows.pipeline import pipeline
    from storage.sql_cli import main as sql_main

    store = str(tmp_path / "store")
    base = tiny_config(tiny_pair, store, sae={"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2},
                       validation={"top": 2, "n_prompts": 2, "max_new_tokens": 4})  # fmt: skip
    first = pipeline(config=PipelineConfig.from_dict(base))
    assert first.comparison is None and list(first.methods) == ["diff_sae"]

    out = pipeline(config=PipelineConfig.from_dict({**base, "methods": ["diff_sae", "crosscoder", "adl"]}))
    states = {k: set(v) for k, v in out.stages.items()}
    for stage in ("extract", "commit_activations", "train", "commit_attribution", "rank", "validate", "dashboards"):
        assert states[stage] == {"Cached"}, (stage, states)  # adding methods recomputes nothing of diff_sae
    for method in ("crosscoder", "adl"):
        for stage in ("train", "commit_attribution", "rank", "validate", "dashboards"):
            assert states[f"{method}:{stage}"] == {"Completed"}, (method, stage, states)
    assert states["compare"] == {"Completed"}
    assert out.sae == first.sae and out.ranking == first.ranking

    ctx = RunContext.create(store, "t")
    rows = {r["method"]: r for r in out.comparison.rows}
    assert list(rows) == ["diff_sae", "crosscoder", "adl"]
    assert rows["crosscoder"]["n_latents"] == 64 and rows["crosscoder"]["k"] == 4
    assert rows["adl"]["n_latents"] == 1 and rows["adl"]["architecture"] == "direction"
    assert rows["diff_sae"]["kl_gap_recovered"] == first.sae.kl_gap_recovered > 0
    for method, result in out.methods.items():
        mctx = ctx.for_method(method)
        con = mctx.duck()
        n = con.execute("SELECT count(*) FROM latents").fetchone()[0]
        assert n == result.analysis.ranking.n_latents > 0, method
        assert con.execute("SELECT count(*) FROM latent_tokens").fetchone()[0] > 0
        assert mctx.store.exists(mctx.paths.url("dashboards", "index.html"))
        assert result.sae.kl_gap_recovered <= 1.0 and result.sae.val_tokens > 0, (method, result.sae)
    con = ctx.duck()
    got = con.execute("SELECT method, n_latents FROM methods ORDER BY method").fetchall()
    assert got == [("adl", 1), ("crosscoder", 64), ("diff_sae", 64)]
    n_cc = con.execute("SELECT count(*) FROM crosscoder.latents").fetchone()[0]
    assert n_cc == out.methods["crosscoder"].analysis.ranking.n_latents
    assert con.execute("SELECT count(*) FROM crosscoder.latent_scaling").fetchone()[0] == 64
    with pytest.raises(duckdb.CatalogException):
        con.execute("SELECT * FROM latent_scaling")  # the diff-SAE has no such table
    page = Path(out.comparison.index).read_text()
    for link in ("../dashboards/index.html", "crosscoder/dashboards/index.html", "adl/dashboards/index.html"):
        assert f'href="{link}"' in page
        assert (Path(out.comparison.index).parent / link).is_file()

    buf = io.StringIO()  # not capsys: Prefect's console handler would write to it after it is closed
    with contextlib.redirect_stdout(buf):
        assert sql_main(["sql", "SELECT count(*) AS n FROM crosscoder.latents", "--store", store, "--run", "t",
                         "--format", "csv"]) == 0  # fmt: skip
    assert buf.getvalue().split() == ["n", str(n_cc)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["eval", "--store", store, "--run", "t"]) == 0
    printed = buf.getvalue()
    assert all(f"== method {m} ==" in printed for m in ("diff_sae", "crosscoder", "adl")), printed

    again = pipeline(config=PipelineConfig.from_dict({**base, "methods": ["diff_sae", "crosscoder", "adl"]}))
    assert all(set(v) == {"Cached"} for v in again.stages.values()), again.stages
