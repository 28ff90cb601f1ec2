"""Every Parquet table of a run: its name, where it lives (relative to the run root) and its Arrow schema.

The one definition: writers build their tables with these schemas, storage/duck.py makes one view per entry of
TABLES, the dashboards and the tests read the same names. A column added here is added everywhere.

    from storage.schemas import LATENT_TOKENS, TABLES
    pa.table({...}, schema=LATENT_TOKENS)
    TABLES["latent_tokens"].path        # "analysis/latent_tokens/*.parquet"
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


def from_rows(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """A table of `schema` from row tuples in its column order (no rows: the empty table)."""
    columns = list(zip(*rows)) if rows else [[] for _ in schema.names]
    return pa.table([pa.array(list(c), f.type) for c, f in zip(columns, schema)], schema=schema)


# ---------------------------------------------------------------- activations stage (activations/)

# One row per token of every document (the projection of the shards the analysis reads its tokens from).
TOKENS = _schema(
    ("doc_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("token", pa.string()),
    ("role", pa.string()), ("kl", pa.float32()),
)  # fmt: skip

# Columns every activation shard starts with: TOKENS + in_sae (the token is SAE data); `diff` (and `base`, `ft`
# with extract.save_raw; STATE_COLUMNS with extract.save_states) follow, see activation_shard().
SHARD_PREFIX = pa.schema(list(TOKENS) + [pa.field("in_sae", pa.bool_())])
# extract.save_states: float32 h_base and h_ft at the layer and the finetuned final hidden state, what the
# attribution stage reads instead of running both models unpatched (diffsae.extract.States, in this order).
STATE_COLUMNS = ("h_base", "h_ft", "x_ft")


def activation_shard(d: int, dtype: str, save_raw: bool, save_states: bool = False) -> pa.Schema:
    """A shard's schema: SHARD_PREFIX + `diff` (h_ft − h_base, fixed_size_list of `dtype` [d]) [+ `base`, `ft`]
    [+ STATE_COLUMNS, float32 [d]]."""
    val = pa.float16() if dtype == "float16" else pa.float32()
    fields = list(SHARD_PREFIX) + [pa.field("diff", pa.list_(val, d))]
    if save_raw:
        fields += [pa.field("base", pa.list_(val, d)), pa.field("ft", pa.list_(val, d))]
    if save_states:
        fields += [pa.field(name, pa.list_(pa.float32(), d)) for name in STATE_COLUMNS]
    return pa.schema(fields)


# One row per document (behaviour: the planted label, NULL or "none" for ordinary documents).
DOCS = _schema(
    ("doc_id", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("behaviour", pa.string()),
    ("n_tokens", pa.int32()),
)  # fmt: skip

# ---------------------------------------------------------------- analysis stage (analysis/)

# TOKENS + the KL of the three patched runs: h_base, h_base + b_dec, h_base + SAE reconstruction; and attr_weight,
# the weight of the token's KL in the attributed objective (1 for every analysed token, or a token selection's
# inverse-probability weight, 0 when not drawn; 0 before skip_first): the attributions are estimates built with it.
ANALYSIS_TOKENS = pa.schema(
    list(TOKENS)
    + [pa.field(n, pa.float32()) for n in ("kl_patch_base", "kl_patch_bias", "kl_patch_recon", "attr_weight")]
)

# One row per (token, firing latent): its activation and its integrated-gradients share of the token's KL.
LATENT_TOKENS = _schema(
    ("doc_id", pa.int64()), ("pos", pa.int32()), ("latent_id", pa.int32()), ("activation", pa.float32()),
    ("kl_attribution", pa.float32()),
)  # fmt: skip

# LATENT_TOKENS aggregated per (latent, document) by the attribution stage; the ranking reads it.
LATENT_DOCS = _schema(
    ("latent_id", pa.int32()), ("doc_id", pa.int64()), ("n_tokens", pa.int32()), ("act_sum", pa.float64()),
    ("act_max", pa.float32()), ("attr_sum", pa.float64()), ("attr_max", pa.float32()),
)  # fmt: skip

# Tokens each latent's decoder direction promotes / suppresses most through the finetuned unembedding.
LATENT_DIRS = _schema(
    ("latent_id", pa.int32()), ("promoted", pa.list_(pa.string())), ("suppressed", pa.list_(pa.string()))
)

# Run-level figures (SAE validation metrics, completeness, timings).
METRICS = _schema(("name", pa.string()), ("value", pa.float64()))

# ---------------------------------------------------------------- rank stage (analysis/)

# Per score (SCORES of diffsae.config), the latents table has `score_<name>` and `rank_<name>`.
_LATENT_STATS = pa.schema(
    [pa.field("latent_id", pa.int32()), pa.field("n_active", pa.int64()), pa.field("n_docs", pa.int64())]
    + [pa.field(n, pa.float64()) for n in ("frequency", "mean_activation", "max_activation", "kl_attr_sum",
                                           "kl_attr_mean", "kl_attr_max", "pos_mass", "doc_share",
                                           "doc_share_all", "pos_mass_all")]
)  # fmt: skip


def latents_schema(scores: tuple[str, ...]) -> pa.Schema:
    """The `latents` table (storage/sql/rank_latents.sql): statistics on the analysed tokens (`rank.roles`), the
    document shares that tell narrow from broad, score_* and rank_* per score (NULL ranks: not narrow), rank_broad
    (NULL: not broad), rank, the planted behaviour that dominates the latent's attribution, promoted/suppressed."""
    fields = list(_LATENT_STATS)
    fields += [pa.field(f"score_{s}", pa.float64()) for s in scores]
    fields += [pa.field(f"rank_{s}", pa.int64()) for s in scores]
    fields += [
        pa.field("rank_broad", pa.int64()),
        pa.field("rank", pa.int64()),
        pa.field("dominant_behaviour", pa.string()),
        pa.field("dominant_share", pa.float64()),
        pa.field("promoted", pa.list_(pa.string())),
        pa.field("suppressed", pa.list_(pa.string())),
    ]
    return pa.schema(fields)


# Near-duplicate latents merged into groups (storage/groups.py): one row per grouped latent (the head of the
# ranking). group_id: its leader's (best member's) latent_id; jaccard: of its document set with the leader's.
LATENT_GROUPS = _schema(
    ("group_id", pa.int32()), ("group_rank", pa.int64()), ("n_members", pa.int64()), ("latent_id", pa.int32()),
    ("rank", pa.int64()), ("jaccard", pa.float64()),
)  # fmt: skip

# Planted-behaviour recovery per (order, behaviour), only for data with behaviour labels (storage/recovery.py).
# score: a score or a baseline order (frequency, firing_kl, random). v1 (scores only, NULL for baselines):
# best_rank, recovered, top10_capture_fraction. v2 (held-out documents, precision and coverage): best_rank_v2,
# recovered_v2 (NULL for random), expected_v2 (random: the chance of recovery; else 0/1), n_capturing (narrow
# latents that capture the behaviour), n_heldout (its held-out documents).
RECOVERY = _schema(
    ("score", pa.string()), ("behaviour", pa.string()), ("best_rank", pa.int64()), ("recovered", pa.bool_()),
    ("top10_capture_fraction", pa.float64()), ("best_rank_v2", pa.int64()), ("recovered_v2", pa.bool_()),
    ("expected_v2", pa.float64()), ("n_capturing", pa.int64()), ("n_heldout", pa.int64()),
)  # fmt: skip

# False alarms per order (storage/recovery.py false_alarms): entries of its top 10 that pass recovery v2's test for a
# placebo label (ordinary documents drawn into n_labels labels of docs_per_label each), mean and max over draws.
FALSE_ALARMS = _schema(
    ("score", pa.string()), ("false_alarms", pa.float64()), ("false_alarms_max", pa.int64()),
    ("n_labels", pa.int64()), ("docs_per_label", pa.int64()), ("draws", pa.int64()),
)  # fmt: skip


# ---------------------------------------------------------------- validation stage (analysis/)

# One row per validated entry (the top `validation.top`: entry "group", latent_id = its leader, rank = group_rank,
# members = its latents, ablated and steered together; or entry "latent", members = [latent_id]): ablation from the
# finetuned model (KL removed on its firing tokens / elsewhere in its top documents, share of greedy answers
# changed) and steering of the base (the kept scale, the share of answers it changed; per scale of the sweep, the
# mean coherence NLL of its answers and the limit it was held to; typical_activation: the leader's).
# diffsae/validation.py defines each figure.
VALIDATION = _schema(
    ("latent_id", pa.int32()), ("rank", pa.int64()), ("entry", pa.string()), ("members", pa.list_(pa.int32())),
    ("kl_removed_on_firing", pa.float64()), ("kl_removed_elsewhere", pa.float64()),
    ("generations_changed", pa.float64()),
    ("best_steering_scale", pa.float64()), ("steering_changed", pa.float64()), ("n_docs", pa.int32()),
    ("n_firing_tokens", pa.int64()), ("n_prompts", pa.int32()), ("typical_activation", pa.float64()),
    ("steering_scales", pa.list_(pa.float64())), ("steering_nll", pa.list_(pa.float64())),
    ("coherence_limit", pa.float64()),
)  # fmt: skip

# One row per (validated entry -- latent_id as in `validation` --, prompt, variant): the greedy answer. variant:
# base, base+steer (at the kept scale), finetuned, finetuned-ablated; `scale` is the steering scale (0 otherwise).
VALIDATION_GENERATIONS = _schema(
    ("latent_id", pa.int32()), ("doc_id", pa.int64()), ("prompt", pa.string()), ("variant", pa.string()),
    ("scale", pa.float64()), ("text", pa.string()),
)  # fmt: skip

# ---------------------------------------------------------------- method `crosscoder` (methods/crosscoder/sae/)

# One row per crosscoder latent: Latent Scaling ratios base / finetuned over the fit tokens (ν^ε, ν^r; near 0: the
# latent is specific to the finetune; NaN: it never fired there), its decoder norms per model (diffsae/crosscoder.py).
LATENT_SCALING = _schema(
    ("latent_id", pa.int32()), ("nu_error", pa.float64()), ("nu_recon", pa.float64()),
    ("fit_tokens_fired", pa.int64()), ("norm_base", pa.float64()), ("norm_ft", pa.float64()),
    ("norm_ratio", pa.float64()),
)  # fmt: skip


# ---------------------------------------------------------------- methods comparison (methods/)

# One row per method of the run (tasks/compare.py): its dictionary's validation figures (sae/metrics.json; KL gap
# recovered, FVU and L0 on the validation documents) and its ranking's: entries that fire, behaviours recovered v2 by
# the default list (groups; NULL without labels) out of the labelled behaviours.
METHODS = _schema(
    ("method", pa.string()), ("architecture", pa.string()), ("n_latents", pa.int64()), ("k", pa.int64()),
    ("kl_gap_recovered", pa.float64()), ("fvu", pa.float64()), ("l0", pa.float64()),
    ("dead_fraction", pa.float64()), ("n_ranked", pa.int64()), ("recovered_v2", pa.int64()),
    ("n_behaviours", pa.int64()), ("sae_key", pa.string()), ("ranking_key", pa.string()),
)  # fmt: skip


# ---------------------------------------------------------------- where each table lives


class Table(NamedTuple):
    path: str  # relative to the run root; a glob for partitioned tables
    doc: str  # one line: what a row is


TABLES: dict[str, Table] = {
    "docs": Table("analysis/docs.parquet", "one document"),
    "tokens": Table("analysis/tokens.parquet", "one token, with its KL and the patched-run KLs"),
    "latent_tokens": Table("analysis/latent_tokens/*.parquet", "one (token, firing latent)"),
    "latent_docs": Table("analysis/latent_docs/*.parquet", "one (latent, document)"),
    "latent_dirs": Table("analysis/latent_dirs.parquet", "one latent's promoted / suppressed tokens"),
    "latents": Table("analysis/latents.parquet", "one latent that fires: statistics, scores, ranks"),
    "metrics": Table("analysis/metrics.parquet", "one run-level figure"),
    "recovery": Table("analysis/recovery.parquet", "one (score, planted behaviour)"),
    "latent_groups": Table("analysis/latent_groups.parquet", "one grouped latent: its group and the group's rank"),
    "false_alarms": Table("analysis/false_alarms.parquet", "one order: top-10 entries passing for a placebo label"),
    "validation": Table("analysis/validation.parquet", "one validated latent: ablation and steering figures"),
    "validation_generations": Table(
        "analysis/validation_generations.parquet", "one (validated latent, prompt, variant): its greedy answer"
    ),
    "latent_scaling": Table("sae/latent_scaling.parquet", "one crosscoder latent: latent-scaling ratios, norms"),
    "methods": Table("methods/methods.parquet", "one method of the run: dictionary and ranking figures"),
    "activations": Table("activations/shard-*.parquet", "one token: the activation difference"),
    "activation_docs": Table("activations/docs.parquet", "one document"),
    "activation_tokens": Table("activations/tokens.parquet", "one token"),
}
