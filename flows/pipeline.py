"""The end-to-end diffsae flow: model pair -> activations -> diff-SAE -> attribution + ranking -> dashboards.

Takes the whole config as one typed parameter (the Prefect UI renders it as a form). Every stage is cached on its
config section, the fingerprints of its inputs and its task source, with results persisted on the run's store:
a rerun with nothing changed recomputes nothing, a changed `sae.k` reruns training and what follows.

    python -m flows.pipeline            # the embedded default: built-in planted pair, ./diffsae-data
    diffsae run --config run.yaml       # the CLI runs preflight checks first, then this flow
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from diffsae.config import PipelineConfig
from flows import stages


@flow(name="diffsae-pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Run every stage; returns the per-stage state (Completed / Cached) and the stage outputs."""
    t0 = time.perf_counter()
    states: dict[str, dict[str, int]] = {}
    with stages.locked(config):
        activations = stages._extract(config, states)
        sae = stages._train(config, activations, states)
        analysis = stages._analyse(config, activations, sae, states)
        site = stages._dashboards(config, analysis, states)
    return {
        "stages": states,
        "activations": {k: v for k, v in activations.items() if k not in ("models", "data")},
        "sae": sae,
        **analysis,
        "dashboards": site,
        "seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    print(pipeline())
