"""One finished run of the whole pipeline on the tiny pair, shared by the export and CLI tests of a process.

Why a helper and not a conftest fixture: only tests/test_export.py and tests/test_cli_runs.py need it, and building
it once per process (not once per module) halves their cost when they run together. 120 prompts give > 1,000 SAE
rows, the number of diff rows the SAELens check compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

SAE = {"n_latents": 64, "k": 4, "batch_size": 64, "epochs": 2}
RUN = "exp"


class FinishedRun(NamedTuple):
    store: str  # a local store folder
    run: str
    pair: Path  # the tiny pair's folder


_BUILT: dict[str, FinishedRun] = {}


def build_finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_pair: Path) -> FinishedRun:
    """The pipeline (extract, train, attribute, rank, dashboards) on the tiny pair, once per process."""
    key = str(tiny_pair)
    if key not in _BUILT:
        import torch

        from diffsae.config import PipelineConfig
        from flows.pipeline import pipeline
        from tests.tiny import make_prompts, tiny_config

        torch.set_num_threads(1)
        root = tmp_path_factory.mktemp("finished_run")
        prompts = make_prompts(root / "prompts.jsonl", n=120, seed=1)
        store = str(root / "store")
        cfg = tiny_config(tiny_pair, store, run=RUN, sae=SAE, attribution={"steps": 4}, data={"path": prompts})
        pipeline(config=PipelineConfig.from_dict(cfg))
        _BUILT[key] = FinishedRun(store, RUN, tiny_pair)
    return _BUILT[key]
