"""Exports of a finished run into the formats other interpretability tools read.

Why a package of its own: the pipeline never needs them, and the formats belong to other projects (SAELens,
SAEDashboard / Neuronpedia) whose conventions change on their schedule, not ours. Only `flows/cli.py`
(`diffsae export`) and the tests import it; it reads a run through `storage` (the store, the DuckDB views) and
loads the SAE with `diffsae.sae`, and neither of those imports it back.

    from exports import ExportError, export_saelens, export_neuronpedia
    export_saelens(ctx, "out/saelens")          # cfg.json + sae_weights.safetensors + README.md
    export_neuronpedia(ctx, "out/neuronpedia")  # batch-<i>.json in SAEDashboard's Neuronpedia batch format
"""

from __future__ import annotations

from exports.common import ExportError, RunInfo, read_run_info
from exports.neuronpedia import export_neuronpedia
from exports.saelens import export_saelens

__all__ = ["ExportError", "RunInfo", "export_neuronpedia", "export_saelens", "read_run_info"]
