"""The end-to-end diffsae flow: model pair -> activations -> diff-SAE -> attribution + ranking -> validation ->
dashboards; with `methods: [diff_sae, crosscoder, adl]` the stages after the activations run once per method, each
under its own prefix, then one comparison of the methods.

Takes the whole config as one typed parameter (the Prefect UI renders it as a form). Every stage is keyed on its
config section, its upstream results and its source, with its output and marker on the run's store: a rerun with
nothing changed recomputes nothing, a changed `sae.k` reruns training and what follows.

    python -m flows.pipeline            # the embedded default: built-in planted pair, ./diffsae-data
    diffsae run --config run.yaml       # the CLI runs preflight checks first, then this flow
"""

from __future__ import annotations

import time
from typing import NamedTuple

from prefect import flow

from diffsae.config import PipelineConfig
from flows import stages
from tasks.attribute import AttributionResult
from tasks.compare import CompareResult
from tasks.dashboards import SiteResult
from tasks.extract import Activations
from tasks.rank import RankingResult
from tasks.train import SAEResult
from tasks.validate import ValidationResult


class PipelineResult(NamedTuple):
    stages: stages.States  # per stage: {"Completed" | "Cached": count}
    activations: Activations
    sae: SAEResult
    attribution: AttributionResult
    ranking: RankingResult
    validation: ValidationResult
    dashboards: SiteResult
    seconds: float
    methods: dict[str, stages.MethodResult] = {}  # every method of `config.methods` (the fields above: the first)
    comparison: CompareResult | None = None  # runs of more than one method


@flow(name="diffsae-pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:
    """Run every stage; returns the per-stage state (Completed / Cached) and the stage results."""
    t0 = time.perf_counter()
    states: stages.States = {}
    with stages.locked(config) as ctx:
        inputs = stages.resolve_inputs(ctx, config, states)
        activations = stages.run_extract(ctx, config, inputs, states)
        methods = {m: stages.run_method(ctx.for_method(m), config, inputs, activations, states) for m in config.methods}
        comparison = stages.run_compare(ctx, methods, states) if len(methods) > 1 else None
    sae, (attribution, ranking), validation, site, _ = methods[config.methods[0]]
    seconds = time.perf_counter() - t0
    return PipelineResult(
        states, activations, sae, attribution, ranking, validation, site, seconds, methods, comparison
    )


if __name__ == "__main__":
    from flows.server import owned_api_server

    with owned_api_server():  # however this process ends, Prefect's temporary server ends with it
        print(pipeline())
