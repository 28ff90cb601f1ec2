"""Synthetic run tables for the dashboard tests and the bench (no models, no storage).

The tables have the columns of docs/DESIGN.md and are internally consistent: the latents table is aggregated
from latent_tokens, per-token attributions roughly sum to the token's KL, a few latents are planted on the
high-KL tokens of each planted behaviour (so `dominant_behaviour` and the recovery table come out of the data,
not out of constants), and some latents never fire (dead). Every table has its storage/schemas.py schema; the
latents table has two of the real scores (SYNTHETIC_SCORES: total = kl_attr_sum, peak_token = kl_attr_max) and,
unlike the pipeline's (one row per latent that fires), also lists the never-firing latents, with n_active 0.

    from tests.synthetic import synthetic_tables, synthetic_summary
    tables = synthetic_tables(n_latents=512, n_docs=200, doc_len=64, seed=0)
    summary = synthetic_summary(tables)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from dashboards.tables import SiteTables
from storage import schemas

BEHAVIOURS = ("none", "french", "pirate", "refusal")
_WORDS = (
    " the", " a", " cat", " dog", " sat", " on", " mat", " and", " then", " it", " was", " very", " good",
    " bonjour", " merci", " arr", " matey", " sorry", " cannot", " help", ",", ".", "!", "?", " I", " you",
    "\n", "\n\n", "\t", " ", "  ", "Hello", " world", " café", " 日本", " 🙂", "<|im_start|>", "<|im_end|>",
    "</s>", " &amp;", ' "quoted"', " x<y", " 'single'",
)  # fmt: skip
PLANTED_PER_BEHAVIOUR = 3
BROAD_DOCS = 0.5  # a latent firing in this share of documents gets a rank_broad
SYNTHETIC_SCORES = ("total", "peak_token")  # score_<s> / rank_<s> columns of the synthetic latents table


def as_schema(df: pl.DataFrame, schema: pa.Schema) -> pl.DataFrame:
    """`df` with exactly `schema`'s columns, in its order and of its types (a missing column is a KeyError)."""
    return pl.DataFrame(df.select(schema.names).to_arrow().cast(schema))


def arrow_table(schema: pa.Schema, **columns: Any) -> pa.Table:
    """A pyarrow table with exactly `schema` (a storage/schemas.py table): the given columns converted to their
    types, the others NULL. Tests write the tables a run stores with it, naming only the columns they need."""
    unknown = set(columns) - set(schema.names)
    if unknown or not columns:
        raise ValueError(f"need some columns of {schema.names}, got unknown {sorted(unknown)}")
    n = len(next(iter(columns.values())))
    return pa.table(
        [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema],
        schema=schema,
    )


def synthetic_tables(n_latents: int = 512, n_docs: int = 200, doc_len: int = 64, seed: int = 0) -> SiteTables:
    """Random, consistent tables: `n_docs` documents of `doc_len` tokens, a dictionary of `n_latents`."""
    if n_latents < 1 or n_docs < 1 or doc_len < 2:
        raise ValueError("need n_latents >= 1, n_docs >= 1, doc_len >= 2")
    rng = np.random.default_rng(seed)
    vocab = np.array(_WORDS, dtype=object)
    n_tok = n_docs * doc_len

    behaviours = np.array(BEHAVIOURS, dtype=object)[
        rng.choice(len(BEHAVIOURS), size=n_docs, p=[0.7, 0.1, 0.1, 0.1])
    ]
    doc_id = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
    pos = np.tile(np.arange(doc_len, dtype=np.int32), n_docs)
    token_id = rng.integers(0, len(vocab), size=n_tok).astype(np.int32)
    role = np.where(pos < max(1, doc_len // 4), "user", "assistant")
    kl = rng.lognormal(mean=-4.0, sigma=1.2, size=n_tok)
    planted_doc = behaviours[doc_id] != "none"
    spike = planted_doc & (role == "assistant") & (rng.random(n_tok) < 0.3)
    kl = np.where(spike, kl + rng.lognormal(mean=-0.5, sigma=0.7, size=n_tok), kl).astype(np.float32)
    tokens = pl.DataFrame(
        {
            "doc_id": doc_id,
            "pos": pos,
            "token_id": token_id,
            "token": vocab[token_id].tolist(),
            "role": role.tolist(),
            "kl": kl,
            "kl_patch_base": (kl * rng.uniform(0.0, 0.1, n_tok)).astype(np.float32),
            "kl_patch_bias": (kl * rng.uniform(0.6, 1.0, n_tok)).astype(np.float32),
            "kl_patch_recon": (kl * rng.uniform(0.05, 0.4, n_tok)).astype(np.float32),
            "attr_weight": np.ones(n_tok, np.float32),
        }
    )
    tokens = as_schema(tokens, schemas.ANALYSIS_TOKENS)
    docs = (
        tokens.group_by("doc_id", maintain_order=True)
        .agg(pl.col("token").str.join(""), pl.len().cast(pl.Int32).alias("n_tokens"))
        .rename({"token": "text"})
        .with_columns(
            pl.format("doc-{}", pl.col("doc_id").cast(pl.String).str.zfill(5)).alias("id"),
            pl.Series("behaviour", behaviours.tolist(), dtype=pl.String),
        )
    )
    docs = as_schema(docs, schemas.DOCS)
    latent_tokens = _latent_tokens(rng, n_latents, doc_id, pos, kl, behaviours, spike)
    latent_tokens = as_schema(latent_tokens, schemas.LATENT_TOKENS)
    latents = _latents(rng, latent_tokens, docs, n_latents, n_tok, vocab)
    latents = as_schema(latents, schemas.latents_schema(SYNTHETIC_SCORES))
    metrics = pl.DataFrame(
        {
            "name": ["fvu", "l0", "dead_fraction", "kl_gap_recovered", "n_tokens"],
            "value": [
                float(rng.uniform(0.1, 0.3)),
                latent_tokens.height / n_tok,
                float((latents["n_active"] == 0).mean()),
                float(1.0 - tokens["kl_patch_recon"].mean() / tokens["kl"].mean()),
                float(n_tok),
            ],
        }
    )
    recovery = as_schema(_recovery(latents), schemas.RECOVERY)
    validation, generations = _validation(rng, latents, docs)
    groups = as_schema(_groups(latents), schemas.LATENT_GROUPS)
    return SiteTables(latents, latent_tokens, tokens, docs, as_schema(metrics, schemas.METRICS), recovery,
                      validation, generations, groups)  # fmt: skip


def _groups(latents: pl.DataFrame, top: int = 40) -> pl.DataFrame:
    """The first `top` latents by rank grouped by dominant behaviour (the leader: the best-ranked of each)."""
    head = latents.sort("rank").head(top).with_columns(pl.col("dominant_behaviour").fill_null("?"))
    lead = head.group_by("dominant_behaviour", maintain_order=True).agg(
        pl.col("latent_id").first().alias("group_id"), pl.len().alias("n_members"), pl.col("rank").min().alias("r")
    )
    lead = lead.with_columns(pl.col("r").rank("ordinal").cast(pl.Int64).alias("group_rank"))
    g = head.join(lead, on="dominant_behaviour").with_columns(
        pl.when(pl.col("latent_id") == pl.col("group_id")).then(1.0).otherwise(0.6).alias("jaccard")
    )
    return g.select("group_id", "group_rank", "n_members", "latent_id", "rank", "jaccard").sort("group_rank", "rank")


def _validation(rng: np.random.Generator, latents: pl.DataFrame, docs: pl.DataFrame,
                top: int = 5) -> tuple[pl.DataFrame, pl.DataFrame]:  # fmt: skip
    """The validation stage's tables for the first `top` latents by rank: random figures, 2 prompts each."""
    ids = latents.sort("rank")["latent_id"].head(top).to_list()
    scales = [0.0, 1.0, 2.0, 4.0]
    rows, gens = [], []
    for rank, lid in enumerate(ids, start=1):
        nll = np.sort(rng.uniform(1.0, 4.0, len(scales))).tolist()
        best = max(i for i, n in enumerate(nll) if n <= nll[0] + 1.0)
        rows.append({"latent_id": lid, "rank": rank, "entry": "latent", "members": [lid],
                     "kl_removed_on_firing": float(rng.uniform(0, 1)),
                     "kl_removed_elsewhere": float(rng.uniform(-0.1, 0.5)), "generations_changed": 0.5,
                     "best_steering_scale": scales[best], "steering_changed": 0.5, "n_docs": 2,
                     "n_firing_tokens": int(rng.integers(1, 50)), "n_prompts": 2,
                     "typical_activation": float(rng.uniform(0.1, 1)), "steering_scales": scales, "steering_nll": nll,
                     "coherence_limit": nll[0] + 1.0})  # fmt: skip
        for doc_id in rng.choice(docs["doc_id"].to_numpy(), 2, replace=False).tolist():
            for variant in ("base", "base+steer", "finetuned", "finetuned-ablated"):
                gens.append({"latent_id": lid, "doc_id": doc_id, "prompt": f"<|user|>prompt of doc {doc_id}",
                             "variant": variant, "scale": scales[best] if variant == "base+steer" else 0.0,
                             "text": f"{variant} answer {rank}"})  # fmt: skip
    return (pl.DataFrame(pa.Table.from_pylist(rows, schema=schemas.VALIDATION)),
            pl.DataFrame(pa.Table.from_pylist(gens, schema=schemas.VALIDATION_GENERATIONS)))  # fmt: skip


def _latent_tokens(
    rng: np.random.Generator,
    n_latents: int,
    doc_id: np.ndarray,
    pos: np.ndarray,
    kl: np.ndarray,
    behaviours: np.ndarray,
    spike: np.ndarray,
) -> pl.DataFrame:
    """~4 active latents per token, Zipf-like popularity (5% dead); attributions split the token's KL."""
    n_tok = len(kl)
    weight = 1.0 / (np.arange(n_latents) + 10.0) ** 0.8
    weight[rng.random(n_latents) < 0.05] = 0.0
    weight = rng.permutation(weight)
    live = np.flatnonzero(weight > 0)
    n_planted = min(len(live), PLANTED_PER_BEHAVIOUR * (len(BEHAVIOURS) - 1))
    planted = rng.choice(live, size=n_planted, replace=False)
    weight[planted] = 0.0  # planted latents fire only where planted
    if weight.sum() == 0:
        weight[live] = 1.0
    weight /= weight.sum()

    counts = rng.poisson(4.0, size=n_tok)
    tok = np.repeat(np.arange(n_tok), counts)
    lat = rng.choice(n_latents, size=len(tok), p=weight)
    # planted: each spike token of behaviour b also activates one of b's planted latents
    spike_tok = np.flatnonzero(spike)
    b_idx = np.searchsorted(np.array(BEHAVIOURS[1:], dtype=object), behaviours[doc_id[spike_tok]])
    per_b = np.array_split(planted, len(BEHAVIOURS) - 1)
    p_lat = np.array(
        [per_b[b][rng.integers(len(per_b[b]))] if len(per_b[b]) else -1 for b in b_idx], dtype=np.int64
    )
    keep = p_lat >= 0
    tok = np.concatenate([tok, spike_tok[keep]])
    lat = np.concatenate([lat, p_lat[keep]])
    is_planted = np.concatenate([np.zeros(len(tok) - keep.sum(), bool), np.ones(keep.sum(), bool)])
    act = rng.exponential(1.0, size=len(tok)) + np.where(is_planted, 3.0, 0.0)
    df = pl.DataFrame({"tok": tok, "latent_id": lat.astype(np.int32), "activation": act.astype(np.float32)})
    df = df.unique(["tok", "latent_id"], keep="first", maintain_order=True)
    noise = rng.normal(0.0, 0.15, size=df.height)
    share = df.select(pl.col("activation") / pl.col("activation").sum().over("tok")).to_series().to_numpy()
    t = df["tok"].to_numpy()
    attr = (kl[t] * share * (1.0 + noise) - 0.02 * kl[t] * (noise < -0.2)).astype(np.float32)
    return pl.DataFrame(
        {
            "doc_id": doc_id[t],
            "pos": pos[t],
            "latent_id": df["latent_id"],
            "activation": df["activation"],
            "kl_attribution": attr,
        }
    ).sort("doc_id", "pos", "latent_id")


def _latents(
    rng: np.random.Generator,
    lt: pl.DataFrame,
    docs: pl.DataFrame,
    n_latents: int,
    n_tok: int,
    vocab: np.ndarray,
) -> pl.DataFrame:
    """The latents table aggregated from latent_tokens, with SYNTHETIC_SCORES and dominant behaviour labels."""
    per_doc = lt.group_by("latent_id", "doc_id").agg(pl.col("kl_attribution").sum().alias("s"))
    docs_agg = per_doc.group_by("latent_id").agg(
        pl.len().alias("n_docs"), pl.col("s").clip(0.0).sum().alias("pos_mass")
    )
    agg = lt.group_by("latent_id").agg(
        pl.len().alias("n_active"),
        pl.col("activation").mean().alias("mean_activation"),
        pl.col("activation").max().alias("max_activation"),
        pl.col("kl_attribution").sum().alias("kl_attr_sum"),
        pl.col("kl_attribution").mean().alias("kl_attr_mean"),
        pl.col("kl_attribution").max().alias("kl_attr_max"),
    )
    by_b = (
        lt.join(docs.select("doc_id", "behaviour"), on="doc_id")
        .group_by("latent_id", "behaviour")
        .agg(pl.col("kl_attribution").clip(0.0).sum().alias("b"))
        .with_columns((pl.col("b") / pl.col("b").sum().over("latent_id")).alias("dominant_share"))
        .sort("latent_id", "dominant_share", "behaviour", descending=[False, True, False])
        .group_by("latent_id", maintain_order=True)
        .first()
        .select("latent_id", pl.col("behaviour").alias("dominant_behaviour"), "dominant_share")
    )
    idx = rng.integers(0, len(vocab), size=(n_latents, 10))
    lat = (
        pl.DataFrame({"latent_id": np.arange(n_latents, dtype=np.int32)})
        .join(agg, on="latent_id", how="left")
        .join(docs_agg, on="latent_id", how="left")
        .join(by_b, on="latent_id", how="left")
        .with_columns(
            pl.col("n_active", "n_docs").fill_null(0),
            pl.col("^kl_attr_.*$", "^.*_activation$", "pos_mass").fill_null(0.0),
        )
        .with_columns(
            (pl.col("n_active") / n_tok).alias("frequency"),
            (pl.col("n_docs") / docs.height).alias("doc_share"),
            (pl.col("n_docs") / docs.height).alias("doc_share_all"),
            pl.col("pos_mass").alias("pos_mass_all"),
            pl.col("kl_attr_sum").alias("score_total"),
            pl.col("kl_attr_max").alias("score_peak_token"),
            pl.Series("promoted", vocab[idx[:, :5]].tolist(), dtype=pl.List(pl.String)),
            pl.Series("suppressed", vocab[idx[:, 5:]].tolist(), dtype=pl.List(pl.String)),
        )
    )
    for s in SYNTHETIC_SCORES:
        lat = lat.with_columns(pl.col(f"score_{s}").rank("ordinal", descending=True).alias(f"rank_{s}"))
    broad = pl.col("doc_share_all") >= BROAD_DOCS  # every token is analysed here: broad latents are narrow too
    rank_broad = pl.when(broad).then(pl.col("pos_mass_all").rank("ordinal", descending=True).over(broad))
    return lat.with_columns(pl.col("rank_total").alias("rank"), rank_broad.alias("rank_broad")).sort("rank")


def _recovery(latents: pl.DataFrame, top: int = 20) -> pl.DataFrame:
    """Per score and planted behaviour: best rank of a latent dominated (share >= 0.5) by that behaviour,
    recovered (best rank <= top), and the share of the score's top 10 latents dominated by a planted one."""
    rows: list[dict[str, Any]] = []
    cand = latents.filter(pl.col("dominant_share") >= 0.5)
    planted = cand.filter(pl.col("dominant_behaviour").is_in(BEHAVIOURS[1:]))
    for score in SYNTHETIC_SCORES:
        top10 = int((planted[f"rank_{score}"] <= 10).sum()) / min(10, latents.height)
        for b in BEHAVIOURS[1:]:
            ranks = cand.filter(pl.col("dominant_behaviour") == b)[f"rank_{score}"]
            best = int(ranks.min()) if ranks.len() else None  # type: ignore[arg-type]
            rows.append(
                {
                    "score": score,
                    "behaviour": b,
                    "best_rank": best,
                    "recovered": best is not None and best <= top,
                    "top10_capture_fraction": top10,
                    "best_rank_v2": best,  # no held-out split here: v2 equals v1's best rank
                    "recovered_v2": best is not None and best <= top,
                    "expected_v2": float(best is not None and best <= top),
                    "n_capturing": int(ranks.len()),
                    "n_heldout": PLANTED_PER_BEHAVIOUR,
                }
            )
    return pl.DataFrame(rows, schema_overrides={"best_rank": pl.Int64, "best_rank_v2": pl.Int64})


def synthetic_summary(tables: SiteTables, run: str = "synthetic") -> dict[str, Any]:
    """A run summary dict in the shape the pipeline passes to `render_site` (values taken from the tables)."""
    m = dict(zip(tables.metrics["name"].to_list(), tables.metrics["value"].to_list()))
    return {
        "run": run,
        "base_model": "synthetic/base",
        "finetuned_model": "synthetic/finetuned",
        "layer": 2,
        "sae": {"n_latents": tables.latents.height, "k": 4, "kind": "BatchTopK"},
        "n_latents": tables.latents.height,  # the width: the synthetic latents table lists every latent
        "rank_by": "total",  # the synthetic `rank` is rank_total
        "fvu": m["fvu"],
        "l0": m["l0"],
        "dead_fraction": m["dead_fraction"],
        "kl_gap_recovered": m["kl_gap_recovered"],
        "n_docs": tables.docs.height,
        "n_tokens": tables.tokens.height,
    }


def inject(tables: SiteTables, text: str) -> tuple[SiteTables, int, int]:
    """Hostile copy of `tables` for escaping tests: `text` becomes a prompt, a token, a doc id and labels.

    The document holding the rank-1 latent's top-attribution firing gets `text` as its prompt, its id and its
    behaviour; the firing's token becomes `text` and its KL the run's largest (so it heads the high-KL page);
    the rank-1 latent gets `text` as dominant behaviour and as a promoted and a suppressed token, and as the prompt
    and every answer of its validation generations.
    Returns (tables, doc_id, pos) of the poisoned firing.
    """
    top = int(tables.latents.sort("rank")["latent_id"][0])
    doc_id, pos = (
        tables.latent_tokens.filter(pl.col("latent_id") == top)
        .sort("kl_attribution", descending=True)
        .select("doc_id", "pos")
        .row(0)
    )
    at_doc = pl.col("doc_id") == doc_id
    at_tok = at_doc & (pl.col("pos") == pos)
    kl_max = float(tables.tokens["kl"].max()) * 2 + 1  # type: ignore[arg-type]
    docs = tables.docs.with_columns(
        pl.when(at_doc).then(pl.lit(text)).otherwise(pl.col(c)).alias(c) for c in ("text", "id", "behaviour")
    )
    tokens = tables.tokens.with_columns(
        pl.when(at_tok).then(pl.lit(text)).otherwise(pl.col("token")).alias("token"),
        pl.when(at_tok).then(pl.lit(kl_max, pl.Float32)).otherwise(pl.col("kl")).alias("kl"),
    )
    is_top = pl.col("latent_id") == top
    latents = tables.latents.with_columns(
        pl.when(is_top)
        .then(pl.lit(text))
        .otherwise(pl.col("dominant_behaviour"))
        .alias("dominant_behaviour"),
        pl.when(is_top)
        .then(pl.concat_list(pl.lit(text), pl.col("promoted")))
        .otherwise(pl.col("promoted"))
        .alias("promoted"),
        pl.when(is_top)
        .then(pl.concat_list(pl.lit(text), pl.col("suppressed")))
        .otherwise(pl.col("suppressed"))
        .alias("suppressed"),
    )
    gens = tables.validation_generations
    if gens is not None:
        mine = pl.col("latent_id") == top
        gens = gens.with_columns(
            pl.when(mine).then(pl.lit(text)).otherwise(pl.col(c)).alias(c) for c in ("prompt", "text")
        )
    return tables._replace(latents=latents, tokens=tokens, docs=docs, validation_generations=gens), doc_id, pos
