"""`diffsae export --format neuronpedia`: a run's latents as SAEDashboard's Neuronpedia batch files, plus the
diff-specific evidence (KL attribution per token, scores and ranks, dominant behaviour).

Why this format: it is what Neuronpedia's importer reads (neuronpedia-utils
`convert-saedashboard-to-neuronpedia-export.py`, which consumes SAEDashboard's `NeuronpediaRunner` output), so a
diff-SAE can be browsed with the same tools as any SAE. Field names follow SAEDashboard
(`sae_dashboard/neuronpedia/neuronpedia_dashboard.py`: NeuronpediaDashboardBatch / Feature / Activation
`to_dict`, and `neuronpedia_converter.py` for how each is filled); the files are `batch-<i>.json`
(`neuronpedia_runner.py`), `features_per_batch` features each, in rank order. diffsae's own fields live under a
`diffsae` key on the batch, on each feature and on each activation record, which the importer ignores.
`exports/neuronpedia.schema.json` is the JSON Schema of a batch file, with the source of every field.

Everything is read through the run's DuckDB views (`ctx.duck()`: latents, latent_dirs, latent_tokens, tokens,
docs); nothing loads a model. So what needs the unembedding's logit *values* and was never stored (`pos_values`,
`neg_values`, the logits histogram) is left empty; `pos_str` / `neg_str` are the stored promoted / suppressed
tokens, most promoted first. Feature activations are diffsae's (scaled units, as in the SAELens export).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from diffsae.config import SCORES
from exports.common import ExportError, RunInfo, read_run_info
from storage import duck
from storage.context import RunContext

SCHEMA_FILE = Path(__file__).with_name("neuronpedia.schema.json")
NEEDED_VIEWS = ("latents", "latent_tokens", "tokens", "docs")
STAT_COLUMNS = ("n_active", "n_docs", "frequency", "mean_activation", "max_activation", "kl_attr_sum",
                "kl_attr_mean", "kl_attr_max", "pos_mass")  # fmt: skip
EMPTY_LIST_FIELDS = (  # SAEDashboard fields diffsae has no data for: present (the importer reads them) and empty
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "pos_values", "neg_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist",
)  # fmt: skip


class NeuronpediaExport(NamedTuple):
    out_dir: str
    n_features: int
    files: list[str]  # batch files, in order


def _num(x: Any) -> Any:
    """JSON-safe number: floats to 6 significant digits, NaN/inf to null."""
    if x is None:
        return None
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return int(x)
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _ids_sql(con: Any, ids: list[int]) -> None:
    """Register the selected latent ids as the relation `sel(latent_id)` (a temporary in-memory table)."""
    con.execute("CREATE OR REPLACE TEMP TABLE sel AS SELECT unnest(?::INTEGER[]) AS latent_id", [ids])


def histograms(con: Any, n_bins: int) -> dict[int, tuple[list[float], list[int]]]:
    """Per selected latent: (bar values = bin centres, bar heights = firing tokens) over [0, max activation]."""
    rows = con.execute(
        """
        WITH lt AS (SELECT latent_id, activation FROM latent_tokens WHERE latent_id IN (SELECT latent_id FROM sel)),
             mx AS (SELECT latent_id, max(activation) AS m FROM lt GROUP BY latent_id)
        SELECT latent_id, any_value(m) AS m,
               least(floor(activation / m * $bins), $bins - 1)::INTEGER AS bin, count(*) AS n
        FROM lt JOIN mx USING (latent_id) WHERE m > 0
        GROUP BY latent_id, bin ORDER BY latent_id, bin""",
        {"bins": n_bins},
    ).fetchall()
    out: dict[int, tuple[list[float], list[int]]] = {}
    for lid, m, b, n in rows:
        if lid not in out:
            out[lid] = ([(i + 0.5) * m / n_bins for i in range(n_bins)], [0] * n_bins)
        out[lid][1][int(b)] = int(n)
    return out


def top_contexts(con: Any, n_contexts: int, left: int, right: int) -> dict[int, list[dict[str, Any]]]:
    """Per selected latent, its `n_contexts` strongest documents (one context each, around the token where it
    fires most): the window's tokens, the latent's activation and KL attribution per token, the token KL."""
    rows = con.execute(
        """
        WITH lt AS (SELECT * FROM latent_tokens WHERE latent_id IN (SELECT latent_id FROM sel)),
        best AS (
            SELECT latent_id, doc_id, pos, activation,
                   row_number() OVER (PARTITION BY latent_id, doc_id ORDER BY activation DESC, pos) AS r
            FROM lt),
        top AS (
            SELECT latent_id, doc_id, pos, activation,
                   row_number() OVER (PARTITION BY latent_id ORDER BY activation DESC, doc_id) AS k
            FROM best WHERE r = 1),
        ctx AS (SELECT * FROM top WHERE k <= $n)
        SELECT c.latent_id, c.k, c.doc_id, c.pos AS peak_pos, d.behaviour, t.pos, t.token, t.kl,
               coalesce(x.activation, 0) AS act, coalesce(x.kl_attribution, 0) AS attr
        FROM ctx c
        JOIN tokens t ON t.doc_id = c.doc_id AND t.pos BETWEEN c.pos - $left AND c.pos + $right
        LEFT JOIN docs d ON d.doc_id = c.doc_id
        LEFT JOIN lt x ON x.latent_id = c.latent_id AND x.doc_id = c.doc_id AND x.pos = t.pos
        ORDER BY c.latent_id, c.k, t.pos""",
        {"n": n_contexts, "left": left, "right": right},
    ).fetchall()
    grouped: dict[tuple[int, int], dict[str, Any]] = {}
    for lid, k, doc_id, peak, behaviour, pos, token, kl, act, attr in rows:
        rec = grouped.get((lid, k))
        if rec is None:
            rec = grouped[(lid, k)] = {"latent_id": lid, "doc_id": doc_id, "peak_pos": peak, "behaviour": behaviour,
                                       "pos": [], "tokens": [], "values": [], "attr": [], "kl": []}  # fmt: skip
        rec["pos"].append(pos)
        rec["tokens"].append(token)
        rec["values"].append(act)
        rec["attr"].append(attr)
        rec["kl"].append(kl)
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (lid, _k), rec in sorted(grouped.items()):
        out[lid].append(rec)
    return out


def feature_max(row: dict[str, Any], contexts: list[dict[str, Any]]) -> float:
    """The latent's max activation: on the scored tokens (latents.max_activation), else (a latent that fires only
    on other roles, e.g. a system-prompt latent of the broad list) over its exported contexts."""
    if row["max_activation"] is not None:
        return float(row["max_activation"])
    return max((float(v) for c in contexts for v in c["values"] if v is not None), default=0.0)


def activation_record(rec: dict[str, Any], feature_max: float) -> dict[str, Any]:
    """One SAEDashboard activation (a "TOP ACTIVATIONS" context: bin_min = bin_contains = -1, bin_max = the
    feature's max, as neuronpedia_converter.py parses that group), plus diffsae's per-token evidence."""
    values = [_num(v) for v in rec["values"]]
    peak = rec["pos"].index(rec["peak_pos"])
    return {
        "bin_min": -1,
        "bin_max": _num(feature_max),
        "bin_contains": -1,
        "tokens": list(rec["tokens"]),
        "values": values,
        "qualifying_token_index": peak,
        "diffsae": {
            "doc_id": int(rec["doc_id"]),
            "behaviour": rec["behaviour"],
            "positions": [int(p) for p in rec["pos"]],
            "kl_attribution": [_num(v) for v in rec["attr"]],
            "kl": [_num(v) for v in rec["kl"]],
        },
    }


def feature_record(
    row: dict[str, Any],
    dirs: tuple[list[str], list[str]] | None,
    hist: tuple[list[float], list[int]] | None,
    contexts: list[dict[str, Any]],
    info: RunInfo,
) -> dict[str, Any]:
    promoted, suppressed = dirs if dirs is not None else (row.get("promoted") or [], row.get("suppressed") or [])
    bar_values, bar_heights = hist if hist is not None else ([], [])
    feature: dict[str, Any] = {
        "feature_index": int(row["latent_id"]),
        **{name: [] for name in EMPTY_LIST_FIELDS},
        "pos_str": list(promoted),
        "neg_str": list(suppressed),
        "frac_nonzero": _num(row["frequency"]),
        "freq_hist_data_bar_values": [_num(v) for v in bar_values],
        "freq_hist_data_bar_heights": [int(h) for h in bar_heights],
        "n_prompts_total": info.n_docs,
        "n_tokens_in_prompt": info.context_size,
        "dataset": info.prompts,
        "activations": [activation_record(c, feature_max(row, contexts)) for c in contexts],
        "diffsae": {
            "rank": None if row["rank"] is None else int(row["rank"]),
            **{c: row[c] for c in ("rank_broad",) if c in row},
            **{c: _num(row[c]) for c in ("doc_share", "doc_share_all", "pos_mass_all") if c in row},
            "rank_by": info.rank_by,
            "scores": {s: _num(row.get(f"score_{s}")) for s in SCORES if f"score_{s}" in row},
            "ranks": {s: row.get(f"rank_{s}") for s in SCORES if f"rank_{s}" in row},
            "dominant_behaviour": row.get("dominant_behaviour"),
            "dominant_share": _num(row.get("dominant_share")),
            **{c: _num(row[c]) for c in STAT_COLUMNS if c in row},
        },
    }
    return feature


def batch_header(info: RunInfo, sae_set: str) -> dict[str, Any]:
    return {
        "model_id": info.finetuned,
        "layer": info.layer,
        "sae_set": sae_set,
        "sae_id_suffix": None,
        "diffsae": {
            "run": info.run,
            "input": "diff",
            "diff": "h_finetuned - h_base",
            "hook_name": info.hook_name,
            "base_model": info.base,
            "finetuned_model": info.finetuned,
            "activations_fingerprint": info.activations_fingerprint,
            "rank_by": info.rank_by,
            "activation_units": "diffsae scaled units (as the SAELens export's encode)",
        },
    }


def export_neuronpedia(
    ctx: RunContext,
    out_dir: str | os.PathLike[str],
    top: int | None = None,
    features_per_batch: int = 128,
    n_contexts: int = 20,
    window: tuple[int, int] = (32, 8),
    n_bins: int = 40,
    sae_set: str | None = None,
) -> NeuronpediaExport:
    """Write `batch-<i>.json` files for the run's ranked latents (the `top` first by rank, else all that fire)."""
    if features_per_batch < 1 or n_contexts < 1 or n_bins < 1 or min(window) < 0 or (top is not None and top < 1):
        raise ExportError("features_per_batch, n_contexts, n_bins and top must be >= 1, the window >= 0")
    info = read_run_info(ctx)
    if info.rank_by is None:
        raise ExportError(f"run '{ctx.run}' has no ranking (analysis/ranking.json): run the pipeline first")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    con = ctx.duck()
    views = set(duck.view_names(con))
    missing = [v for v in NEEDED_VIEWS if v not in views]
    if missing:
        raise ExportError(f"run '{ctx.run}' lacks the tables {', '.join(missing)}: run the pipeline first")
    limit = f"LIMIT {int(top)}" if top is not None else ""
    latents = con.execute(f"SELECT * FROM latents ORDER BY rank, latent_id {limit}").to_arrow_table().to_pylist()
    ids = [int(r["latent_id"]) for r in latents]
    _ids_sql(con, ids)
    dirs: dict[int, tuple[list[str], list[str]]] = {}
    if "latent_dirs" in views:
        q = "SELECT latent_id, promoted, suppressed FROM latent_dirs WHERE latent_id IN (SELECT latent_id FROM sel)"
        dirs = {lid: (p or [], s or []) for lid, p, s in con.execute(q).fetchall()}
    hists = histograms(con, n_bins)
    contexts = top_contexts(con, n_contexts, *window)
    features = [feature_record(r, dirs.get(r["latent_id"]), hists.get(r["latent_id"]),
                               contexts.get(r["latent_id"], []), info) for r in latents]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("batch-*.json"):  # a smaller re-export leaves no batch of an earlier one behind
        stale.unlink()
    header = batch_header(info, sae_set or f"diffsae-{info.run}")
    files = []
    for i, start in enumerate(range(0, max(len(features), 1), features_per_batch)):
        path = out / f"batch-{i}.json"
        batch = {**header, "features": features[start : start + features_per_batch]}
        path.write_text(json.dumps(batch, allow_nan=False, ensure_ascii=False) + "\n")
        files.append(str(path))
    settings = {"top": top, "features_per_batch": features_per_batch, "n_contexts": n_contexts,
                "window": list(window), "n_bins": n_bins, "n_features": len(features), "run": info.run,
                "store": info.store, "schema": SCHEMA_FILE.name}  # fmt: skip
    (out / "run_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return NeuronpediaExport(str(out), len(features), files)


def load_schema() -> dict[str, Any]:
    """The JSON Schema of a batch file (exports/neuronpedia.schema.json)."""
    return json.loads(SCHEMA_FILE.read_text())
