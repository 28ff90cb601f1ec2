"""`diffsae --version`, `diffsae runs` (each stage done / missing / stale) and `diffsae open`, on a finished run
and on copies of it with stages removed or rewritten; every bad request is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from flows.cli import main
from tests.finished_run import FinishedRun, build_finished_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_pair: Path) -> FinishedRun:
    return build_finished_run(tmp_path_factory, tiny_pair)


def _copy(finished: FinishedRun, tmp_path: Path, run: str = "copy") -> Path:
    """A copy of the finished run (file times kept) as run `run` of a new store under tmp_path; its run folder."""
    dst = tmp_path / "store" / "runs" / run
    shutil.copytree(Path(finished.store) / "runs" / finished.run, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst


def _touch_later(path: Path) -> None:
    later = time.time() + 5
    os.utime(path, (later, later))


def _table(out: str) -> dict[str, dict[str, str]]:
    """`diffsae runs` output -> {run: {stage: state}} (the state's first word)."""
    lines = out.strip().splitlines()
    assert lines[0].startswith("store ")
    header = lines[1].split()
    rows = {}
    for line in lines[2:]:
        name, rest = line.split(maxsplit=1)
        cells = [c.strip() for c in rest.split("  ") if c.strip()]
        rows[name] = {stage: cell.split()[0] for stage, cell in zip(header[1:], cells)}
    return rows


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"diffsae {version('diffsae')}"


@pytest.mark.slow
def test_runs_states(finished: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--store", finished.store]) == 0
    assert _table(capsys.readouterr().out) == {finished.run: {s: "done" for s in _STAGES}}

    fresh = _copy(finished, tmp_path, "fresh")
    retrained = _copy(finished, tmp_path, "retrained")
    _touch_later(retrained / "sae" / "metrics.json")  # the SAE was rewritten after the analysis
    undashed = _copy(finished, tmp_path, "undashed")
    (undashed / "dashboards" / "site.json").unlink()
    other = _copy(finished, tmp_path, "other-acts")
    cfg = json.loads((other / "sae" / "cfg.json").read_text())
    (other / "sae" / "cfg.json").write_text(json.dumps({**cfg, "activations_fingerprint": "0" * 32}))
    bare = _copy(finished, tmp_path, "bare")
    shutil.rmtree(bare / "activations")
    (tmp_path / "store" / "runs" / ".hidden").mkdir()

    assert main(["runs", "--store", str(tmp_path / "store")]) == 0
    got = _table(capsys.readouterr().out)
    done = {s: "done" for s in _STAGES}
    assert got == {
        "fresh": done,
        "retrained": {**done, **{s: "stale" for s in ("attribution", "ranking", "validation", "dashboards")}},
        "undashed": {**done, "dashboards": "missing"},
        "other-acts": {**done, **{s: "stale" for s in _STAGES[1:]}},
        "bare": {"activations": "missing", **{s: "stale" for s in _STAGES[1:]}},
    }
    assert fresh.exists()


_STAGES = ["activations", "sae", "attribution", "ranking", "validation", "dashboards"]


def test_runs_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--store", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"diffsae: error: store {tmp_path / 'nowhere'} does not exist" and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["runs", "--store", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"no runs on {tmp_path / 'empty'}"


@pytest.mark.slow
def test_open(
    finished: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["open", "--store", finished.store, "--run", finished.run]) == 0
    index = capsys.readouterr().out.strip()
    assert index == str(Path(finished.store) / "runs" / finished.run / "dashboards" / "index.html")
    assert Path(index).is_file()

    opened: list[str] = []
    import webbrowser

    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    assert main(["open", "--store", finished.store, "--run", finished.run, "--browser"]) == 0
    assert opened == ["file://" + index] and capsys.readouterr().out.strip() == index

    undashed = _copy(finished, tmp_path, "undashed")
    shutil.rmtree(undashed / "dashboards")
    for run, why in (("undashed", "has no dashboards"), ("missing", "does not exist")):
        opened.clear()
        assert main(["open", "--store", str(tmp_path / "store"), "--run", run, "--browser"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith(f"diffsae: error: run '{run}'") and why in out.err
        assert out.err.count("\n") == 1 and opened == []


@pytest.mark.slow
def test_export_errors(finished: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", "--format", "saelens", "--out", str(out), "--store", finished.store, "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsae: error: run 'nope' does not exist") and err.count("\n") == 1
    assert not out.exists()

    unranked = _copy(finished, tmp_path, "unranked")
    (unranked / "analysis" / "ranking.json").unlink()
    store = str(tmp_path / "store")
    assert main(["export", "--format", "neuronpedia", "--out", str(out), "--store", store, "--run", "unranked"]) == 2
    assert "has no ranking" in capsys.readouterr().err and not out.exists()

    untrained = _copy(finished, tmp_path, "untrained")
    shutil.rmtree(untrained / "sae")
    assert main(["export", "--format", "saelens", "--out", str(out), "--store", store, "--run", "untrained"]) == 2
    assert "has no trained SAE" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_runs_open_export_on_s3(
    finished: FinishedRun, s3_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same commands on a real S3 store (the finished run uploaded, its markers last and in stage order)."""
    from flows.runs import STAGES
    from storage.store import Store

    store, local = Store(s3_store), Path(finished.store) / "runs" / finished.run
    remote = f"{s3_store}/runs/{finished.run}"
    markers = {marker for _, marker, _ in STAGES}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel not in markers and rel != "LOCK":
            store.put_file(str(path), f"{remote}/{rel}")
    for _, marker, _ in STAGES:  # S3 times have 1 s resolution: one second apart, as the stages wrote them
        store.put_file(str(local / marker), f"{remote}/{marker}")
        time.sleep(1.1)

    assert main(["runs", "--store", s3_store]) == 0
    assert _table(capsys.readouterr().out) == {finished.run: {s: "done" for s in _STAGES}}
    assert main(["open", "--store", s3_store, "--run", finished.run]) == 0
    index = Path(capsys.readouterr().out.strip())
    assert index.read_bytes() == (local / "dashboards" / "index.html").read_bytes()
    assert main(["open", "--store", s3_store, "--run", "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err

    out = tmp_path / "exports"
    for fmt in ("saelens", "neuronpedia"):
        assert main(["export", "--format", fmt, "--out", str(out / fmt), "--store", s3_store,
                     "--run", finished.run, "--top", "2"]) == 0  # fmt: skip
    assert json.loads((out / "saelens" / "cfg.json").read_text())["metadata"]["diffsae_store"] == s3_store
    assert len(json.loads((out / "neuronpedia" / "batch-0.json").read_text())["features"]) == 2
