"""examples/minimal.py end to end on the tiny pair: the figures it prints are real and within measured bounds.

Measured with the defaults (--layer 1 --latents 128 --k 4 --steps 300, 1 thread), seeds 0 / 1 / 2: validation FVU
0.234 / 0.240 / 0.249, L0 3.89 / 4.65 / 4.34, KL gap recovered 0.895 / 0.880 / 0.831, completeness max relative
error 2.2e-3 / 3.1e-3 / 1.8e-3 (16 integrated-gradients steps); about 3 s per run.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "minimal.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("diffsae_minimal_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_example_figures() -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        res = load_example().main(["--seed", "0", "--k", "4", "--steps", "300", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res.fvu < 0.5, res.fvu  # measured 0.23-0.25; the mean alone gives 1
    assert 0.75 * 4 <= res.l0 <= 1.25 * 4, res.l0  # inference threshold calibrated to the batch top-k
    assert 0.5 < res.kl_gap_recovered <= 1.0, res.kl_gap_recovered  # measured 0.83-0.90
    assert res.completeness_max_rel_error < 0.01, res.completeness_max_rel_error  # measured <= 3.1e-3
    assert 0.0 <= res.dead_fraction < 0.5, res.dead_fraction
    assert 1 <= len(res.top) <= 10
    scores = [score for _, score, _, _ in res.top]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0 and all(math.isfinite(s) for s in scores)
    assert all(0 <= latent < 128 and n_tokens >= 5 for latent, _, n_tokens, _ in res.top)
    assert len({latent for latent, _, _, _ in res.top}) == len(res.top)
    assert all(label.split()[0] in ("none", "planted") for _, _, _, label in res.top)


def test_minimal_example_runs_as_a_script() -> None:
    """`python examples/minimal.py` from the repo root: `tests.tiny` must import without pytest's sys.path."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "20", "--prompts", "30", "--latents", "64", "--k", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for figure in ("validation: FVU", "KL gap recovered", "max relative error", "top latents", " rank latent"):
        assert figure in out.stdout, out.stdout
