"""Config: YAML loading, unknown keys rejected, one-line errors, CLI exit status 2 before any compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from diffsae.config import SCORE_ALIASES, SCORES, ConfigError, PipelineConfig, RankBy, resolve_score


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_embedded_demo() -> None:
    cfg = PipelineConfig()
    assert cfg.uses_demo_pair and cfg.run == "demo" and cfg.store == "./diffsae-data"
    assert cfg.sae.n_latents == 2048 and cfg.sae.k == 32 and cfg.extract.dtype == "float16"


def test_yaml_contract_keys(tmp_path: Path) -> None:
    cfg = PipelineConfig.from_yaml(
        _yaml(
            tmp_path,
            """
run: r1
store: s3://bucket/prefix
models: {base: a, finetuned: b, layer: 13, dtype: bfloat16, device: auto}
data: {path: prompts.jsonl, max_tokens_per_doc: 256, max_docs: null}
extract: {dtype: float32}
sae: {n_latents: 73728, k: 100}
attribution: {steps: 16}
dashboards: {top_latents: 20}
""",
        ),
        overrides={"run": "r2", "store": None},
    )
    assert cfg.run == "r2" and cfg.store == "s3://bucket/prefix" and cfg.models.layer == 13
    assert cfg.sae.n_latents == 73728 and not cfg.uses_demo_pair


@pytest.mark.parametrize(
    "text, message",
    [
        ("sae: {kk: 3}", r"^.*c.yaml: sae.kk: unknown key$"),
        ("sae: {k: 0}", r"^.*c.yaml: sae.k: Input should be greater than or equal to 1$"),
        ("sae: {k: 64, n_latents: 32}", r"k \(64\) must not exceed n_latents \(32\)"),
        ("store: ftp://x", r"store must be a local folder or s3://bucket/prefix"),
        ("run: 'a b'", r"run must be 1-64 chars"),
        ("models: {base: a, finetuned: b}", r"models.base is set but data is not"),
        ("models: {base: a}", r"models: Value error, give both base and finetuned"),
        ("data: {path: x.jsonl}", r"data is set but models.base is not"),
        ("[1, 2]", r"top level must be a mapping"),
        ("sae: {k: [", r"invalid YAML"),
        ("models: {base: a, finetuned: b, device: tpu}\ndata: {path: x}", r"device must be auto"),
        (
            "attribution: {rank_by: nonsense}",
            r"^.*c.yaml: attribution.rank_by: .*unknown rank_by 'nonsense': choose one of total, mean, peak_token, "
            r"peak_doc, concentration, top_docs, focus, fusion "
            r"\(or score_<name>, kl_attr_sum, kl_attr_mean, kl_attr_max\)$",
        ),
    ],
)
def test_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        PipelineConfig.from_yaml(_yaml(tmp_path, text))
    assert "\n" not in str(e.value)


def test_rank_by_literal_is_the_scores_and_their_aliases() -> None:
    """One list: the RankBy Literal (the config's type and JSON-schema enum) = SCORES + SCORE_ALIASES, every alias
    names a score, and every accepted value is valid config that resolves to a score."""
    assert get_args(RankBy) == SCORES + tuple(SCORE_ALIASES)
    assert set(SCORE_ALIASES.values()) <= set(SCORES) and not set(SCORE_ALIASES) & set(SCORES)
    assert PipelineConfig.model_json_schema()["$defs"]["AttributionConfig"]["properties"]["rank_by"]["enum"] == list(
        get_args(RankBy)
    )
    for name in get_args(RankBy):
        cfg = PipelineConfig.from_dict({"attribution": {"rank_by": name}})
        assert cfg.attribution.rank_by == name and resolve_score(name) in SCORES
    assert resolve_score("kl_attr_sum") == "total" and resolve_score("score_focus") == "focus"
    with pytest.raises(ConfigError, match=r"^config: attribution.rank_by: .*unknown rank_by 3: choose one of total"):
        PipelineConfig.from_dict({"attribution": {"rank_by": 3}})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        PipelineConfig.from_yaml(tmp_path / "nope.yaml")


def _cli_run(cfg: Path) -> subprocess.CompletedProcess[str]:
    """`diffsae run --config cfg` in a fresh interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cfg = _yaml(tmp_path, f"store: {store}\nsae: {{k: -1}}\n")
    r = _cli_run(cfg)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("diffsae: error: ")
    assert "sae.k" in r.stderr
    assert not store.exists()


def test_cli_missing_data_file_exits_2_before_compute(tmp_path: Path, tiny_pair: Path) -> None:
    store = tmp_path / "store"
    cfg = _yaml(
        tmp_path,
        f"""store: {store}
models: {{base: {tiny_pair / "base"}, finetuned: {tiny_pair / "finetuned"}, layer: 1}}
data: {{path: {tmp_path / "missing.jsonl"}}}
""",
    )
    r = _cli_run(cfg)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"diffsae: error: data file not found: {tmp_path / 'missing.jsonl'}"
    assert not (store / "runs").exists()


def test_cli_unknown_rank_by_exits_2_before_compute(tmp_path: Path) -> None:
    """A score name that does not exist fails at config time: exit 2, one readable line naming the key, before the
    data file check or any model load (the model and data paths do not even exist), nothing written."""
    store = tmp_path / "store"
    cfg = _yaml(
        tmp_path,
        f"""store: {store}
models: {{base: {tmp_path / "no-base"}, finetuned: {tmp_path / "no-finetuned"}}}
data: {{path: {tmp_path / "missing.jsonl"}}}
attribution: {{rank_by: nonsense}}
""",
    )
    r = _cli_run(cfg)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("diffsae: error: "), r.stderr
    assert "attribution.rank_by" in r.stderr and "'nonsense'" in r.stderr and "kl_attr_max" in r.stderr
    assert "'score_total'" not in r.stderr  # pydantic's literal list (17 quoted values) is replaced
    assert len(r.stderr) < 300 and r.stdout == ""
    assert not store.exists()
