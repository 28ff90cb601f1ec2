"""The analysis half of the pipeline's configuration: KL attribution, the latent scores and ranking, causal
validation and the dashboards (sections of `diffsae.config.PipelineConfig`, which re-exports them).

    AttributionConfig(steps=4, rule="gauss_legendre").resolved(n_tokens)
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from diffsae.config_base import Section as _Section

# Latent scores (defined and documented in storage/sql/rank_latents.sql): each is a `score_<name>` and a
# `rank_<name>` column of the latents table; `attribution.rank_by` picks the one that defines `rank`.
Score = Literal["total", "mean", "peak_token", "peak_doc", "concentration", "top_docs", "focus", "fusion"]
SCORES: tuple[str, ...] = get_args(Score)
# Every accepted `rank_by`: a score, `score_<name>`, or a statistics column equal to a score (SCORE_ALIASES).
RankBy = Literal[
    Score,
    "score_total", "score_mean", "score_peak_token", "score_peak_doc", "score_concentration", "score_top_docs",
    "score_focus", "score_fusion",
    "kl_attr_sum", "kl_attr_mean", "kl_attr_max",
]  # fmt: skip
SCORE_ALIASES: dict[str, str] = {
    **{f"score_{s}": s for s in SCORES},
    "kl_attr_sum": "total",
    "kl_attr_mean": "mean",
    "kl_attr_max": "peak_token",
}
# The Literal (typing, JSON schema, the Prefect form) and the names the ranking resolves are one list.
assert get_args(RankBy) == SCORES + tuple(SCORE_ALIASES), "RankBy must list SCORES then SCORE_ALIASES"


def resolve_score(rank_by: str) -> str:
    """The score name for `rank_by` (a score, `score_<name>` or a kl_attr_* alias), else a one-line ValueError."""
    name = SCORE_ALIASES.get(rank_by, rank_by) if isinstance(rank_by, str) else rank_by
    if name not in SCORES:
        raise ValueError(
            f"unknown rank_by {rank_by!r}: choose one of {', '.join(SCORES)}"
            " (or score_<name>, kl_attr_sum, kl_attr_mean, kl_attr_max)"
        )
    return name


class AttributionConfig(_Section):
    steps: int = Field(4, ge=1, description="Quadrature points of the integrated-gradients path")
    rule: Literal["midpoint", "gauss_legendre"] = Field("gauss_legendre", description="Quadrature rule of the path")
    max_rel_error: float = Field(0.01, gt=0, description="Documents missing it get more points: Kronrod, then doubled")
    max_steps: int = Field(64, ge=1, description="Refinement stops at this many points (the error is reported)")
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Matmuls of the gradient passes' upper blocks (auto: bfloat16 where the device has "
        "native bfloat16); KL columns and completeness always float32, a missing document redone in float32"
    )  # fmt: skip
    rank_by: RankBy = Field(
        "mean",
        description="Latent score that defines `rank`: total, mean, peak_token, peak_doc, concentration, top_docs, "
        "focus, fusion (or score_<name>, kl_attr_sum, kl_attr_mean, kl_attr_max)",
    )
    top_promoted: int = Field(10, ge=1, description="Promoted/suppressed tokens kept per latent")
    tokens: Literal["all", "select", "auto"] = Field(
        "auto", description="Whose KL is attributed: every analysed token, a weighted selection, or `select` when "
        "the run has more than `select_above` tokens"
    )  # fmt: skip
    select_top: float = Field(0.1, ge=0, le=1, description="Selection: share of each document's tokens by KL kept")
    select_sample: float = Field(0.25, gt=0, le=1, description="Selection: probability of drawing each other token")
    select_above: int = Field(50_000, ge=0, description="`auto` selects when the run has more tokens than this")
    select_seed: int = Field(0, description="Seed of the selection's draws (per document, with its doc_id)")
    shard_tokens: int = Field(8192, ge=16, description="Tokens per attribution shard (a cached task on extract.runner)")

    def resolved(self, n_tokens: int) -> "AttributionConfig":
        """`tokens` resolved for a run of `n_tokens` tokens (`auto` -> `all` or `select`), the selection's settings
        reset to their defaults when nothing is selected (so they never change a key they do not affect)."""
        select = self.tokens == "select" or (self.tokens == "auto" and n_tokens > self.select_above)
        if select:
            return self.model_copy(update={"tokens": "select"})
        unused = {k: type(self).model_fields[k].default for k in ("select_top", "select_sample", "select_seed")}
        return self.model_copy(update={"tokens": "all", "select_above": 0, **unused})

    @field_validator("rank_by", mode="before")
    @classmethod
    def _known_score(cls, v: Any) -> Any:
        resolve_score(v)  # one readable line listing the scores, instead of pydantic's 17 quoted literals
        return v


# Token roles (diffsae/data.py): a chat message's role, "template" for chat markup and the template's own text (e.g. a
# default system prompt), "text" for plain-text rows.
Role = Literal["system", "user", "assistant", "template", "text"]


class RankConfig(_Section):
    """Which tokens the narrow ranking reads, and what counts as a broad change (storage/sql/rank_latents.sql).

    Default: the tokens the model writes (assistant turns; plain text, where roles are unknown). The KL on a system
    prompt, a user turn or the chat markup measures how the finetune models text it is given, not what it says; a
    change there fires in every document that carries it and crowded the top of the list on a real chat model."""

    roles: list[Role] = Field(
        ["assistant", "text"], min_length=1, description="Token roles whose attribution the narrow ranking scores"
    )
    broad_docs: float = Field(
        0.9,
        gt=0,
        le=1,
        description="A latent firing (on those roles) in at least this share of documents is a broad change: listed "
        "apart (rank_broad, with latents firing this widely on any token), not in the narrow ranking",
    )

    group_by: Literal["documents", "attribution"] = Field(
        "documents",
        description="What links two latents into a group: their document sets (Jaccard) or their KL attribution over "
        "documents (weighted Jaccard)",
    )
    group_jaccard: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Latents that overlap this much (group_by's Jaccard) with a better-ranked group leader join its "
        "group (latent_groups)",
    )
    group_top: int = Field(500, ge=1, description="Latents grouped: the first this many of the narrow ranking")

    @field_validator("roles")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return sorted(set(v))


class DashboardsConfig(_Section):
    top_latents: int = Field(50, ge=1, description="Latents that get a page (top by rank)")
    n_contexts: int = Field(10, ge=1, description="Top contexts shown per latent, by attribution and by activation")
    n_high_kl_tokens: int = Field(100, ge=1, description="Tokens listed on the high-KL explorer page")


class ValidationConfig(_Section):
    top: int = Field(20, ge=0, description="Entries validated by ablation and steering, top by rank (0: skip)")
    entries: Literal["groups", "latents"] = Field(
        "groups",
        description="What an entry is: a latent group of the default list (its latents ablated and steered together; "
        "latents when the run has no groups) or a single latent of the ranking",
    )
    n_docs: int = Field(8, ge=1, description="Top documents per entry (by KL attribution) for the ablation's KL")
    n_prompts: int = Field(
        4, ge=1, description="Prompts per entry (its top documents up to the assistant turn) for generations"
    )
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Greedy tokens generated per prompt and variant")
    scales: list[float] = Field(
        [0.0, 1.0, 2.0, 4.0, 8.0],
        min_length=1,
        description="Steering scales swept, in units of the latent's typical activation (0, unsteered, is added)",
    )
    activation_quantile: float = Field(
        0.9, gt=0, le=1, description="Quantile of the latent's activations (latent_tokens) used as its typical one"
    )
    coherence_margin: float = Field(
        1.0,
        ge=0,
        description="A steering scale is coherent while its answers' mean NLL per token (under the unsteered base "
        "or the finetuned model, whichever finds them likelier) is at most this many nats above the base's answers",
    )

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(s < 0 for s in v):
            raise ValueError(f"steering scales must be >= 0, got {v}")
        return sorted(set(float(s) for s in v) | {0.0})
