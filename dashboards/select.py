"""Picks what the dashboards show, with polars group/sort/join ops (no Python loops over table rows).

`top_latents` keeps the listed latents; `latent_contexts` the top contexts of each by KL attribution and by
activation; `high_kl_tokens` the largest-KL tokens with the latents credited there; `windows` cuts the token
window around every context with one join and shapes it into `Context`s of display-ready `Tok`s.

    lat = top_latents(tables.latents, 50)
    ctx = latent_contexts(tables.latent_tokens, lat["latent_id"], n=10)
    by_key = windows(ctx.unique(...), tables.tokens, tables.docs, half=24, kl_scale=kl_scale(tables.tokens))
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import polars as pl

from dashboards.plots import fmt

_VISIBLE = {"\n": "\u23ce", "\r": "\u240d", "\t": "\u2192"}


class Tok(NamedTuple):
    text: str  # token with whitespace made visible
    tip: str  # hover text: token repr, KL, and the latent's activation/attribution when it fires here
    alpha: float  # 0..1 shading by per-token KL
    hit: bool  # the context's own token


class Context(NamedTuple):
    doc_id: int
    doc: str  # docs.id
    behaviour: str
    text: str  # the whole prompt
    pos: int
    toks: tuple[Tok, ...]
    cut_left: bool  # the window starts after the document start
    cut_right: bool


@lru_cache(maxsize=65536)
def visible(token: str) -> str:
    """Make whitespace visible: newline -> U+23CE, tab -> U+2192, an all-space token -> middle dots."""
    if token == "":
        return "\u2205"
    if token.strip(" ") == "":
        return "\u00b7" * len(token)
    for raw, shown in _VISIBLE.items():
        token = token.replace(raw, shown)
    return token


def top_latents(latents: pl.DataFrame, n: int) -> pl.DataFrame:
    """The `n` best-ranked latents (rank ascending; ties by latent_id)."""
    return latents.sort("rank", "latent_id", nulls_last=True).head(n)


def broad_latents(latents: pl.DataFrame, n: int) -> pl.DataFrame:
    """The `n` first broad changes (rank_broad ascending); empty for runs ranked before the narrow/broad split."""
    if "rank_broad" not in latents.columns:
        return latents.clear()
    return latents.filter(pl.col("rank_broad").is_not_null()).sort("rank_broad").head(n)


def kl_scale(tokens: pl.DataFrame) -> float:
    """KL that gets full shading: the 99th percentile of positive per-token KL (1.0 if there is none)."""
    q = (
        tokens.filter(pl.col("kl").is_finite() & (pl.col("kl") > 0))
        .select(pl.col("kl").quantile(0.99))
        .item()
    )
    return float(q) if q else 1.0


def latent_contexts(latent_tokens: pl.DataFrame, latent_ids: pl.Series, n: int) -> pl.DataFrame:
    """Per listed latent: its top-n firings by KL attribution (kind "attr") and by activation (kind "act")."""
    lt = latent_tokens.join(pl.DataFrame({"latent_id": latent_ids}), on="latent_id", how="semi")
    parts = []
    for kind, col in (("attr", "kl_attribution"), ("act", "activation")):
        top = (
            lt.filter(pl.col(col).is_finite())
            .filter(pl.col(col).rank("ordinal", descending=True).over("latent_id") <= n)
            .sort("latent_id", col, "doc_id", "pos", descending=[False, True, False, False])
            .with_columns(pl.lit(kind).alias("kind"))
        )
        parts.append(top)
    return pl.concat(parts)


def credits_at(latent_tokens: pl.DataFrame, where: pl.DataFrame, n: int) -> pl.DataFrame:
    """The n largest KL attributions at each (doc_id, pos) of `where`, best first."""
    keys = where.select(pl.col("doc_id").cast(latent_tokens["doc_id"].dtype), pl.col("pos").cast(pl.Int64))
    return (
        latent_tokens.with_columns(pl.col("pos").cast(pl.Int64))
        .join(keys, on=["doc_id", "pos"], how="semi")
        .filter(pl.col("kl_attribution").is_finite())
        .filter(pl.col("kl_attribution").rank("ordinal", descending=True).over("doc_id", "pos") <= n)
        .sort("doc_id", "pos", "kl_attribution", descending=[False, False, True])
    )


def high_kl_tokens(tokens: pl.DataFrame, n: int) -> pl.DataFrame:
    """The n tokens with the largest finite KL, largest first."""
    return (
        tokens.filter(pl.col("kl").is_finite())
        .top_k(n, by="kl")
        .sort("kl", "doc_id", "pos", descending=[True, False, False])
    )


def windows(
    centers: pl.DataFrame,
    tokens: pl.DataFrame,
    docs: pl.DataFrame,
    half: int,
    scale: float,
    latent_tokens: pl.DataFrame | None = None,
) -> dict[tuple[int, ...], Context]:
    """Context windows (±half tokens) around each row of `centers`, keyed by the row's key columns.

    `centers` has doc_id, pos and optionally latent_id; with latent_id and `latent_tokens`, every token of the
    window also carries that latent's activation and attribution there (hover text).
    """
    keyed = "latent_id" in centers.columns
    key_cols = ["latent_id", "doc_id", "pos"] if keyed else ["doc_id", "pos"]
    c = centers.select(key_cols).unique().with_columns(pl.col("pos").cast(pl.Int64))
    offsets = pl.DataFrame({"_off": pl.int_range(-half, half + 1, eager=True).cast(pl.Int64)})
    tok = tokens.select(
        pl.col("doc_id").cast(c["doc_id"].dtype),
        pl.col("pos").cast(pl.Int64).alias("_wpos"),
        "token",
        "kl",
        "role",
    )
    w = (
        c.join(offsets, how="cross")
        .with_columns((pl.col("pos") + pl.col("_off")).alias("_wpos"))
        .join(tok, on=["doc_id", "_wpos"], how="inner")
    )
    if keyed and latent_tokens is not None:
        lt = latent_tokens.select(
            pl.col("doc_id").cast(c["doc_id"].dtype),
            pl.col("pos").cast(pl.Int64).alias("_wpos"),
            pl.col("latent_id").cast(c["latent_id"].dtype),
            "activation",
            "kl_attribution",
        ).join(c.select("latent_id").unique(), on="latent_id", how="semi")
        w = w.join(lt, on=["doc_id", "_wpos", "latent_id"], how="left")
    else:
        w = w.with_columns(
            pl.lit(None, pl.Float32).alias("activation"), pl.lit(None, pl.Float32).alias("kl_attribution")
        )
    w = w.with_columns((pl.col("kl") / scale).fill_nan(0.0).clip(0.0, 1.0).round(2).alias("_a")).sort(
        *key_cols, "_wpos"
    )
    d = docs.select(pl.col("doc_id").cast(c["doc_id"].dtype), "id", "behaviour", "text")
    meta = {r[0]: r[1:] for r in d.join(c.select("doc_id").unique(), on="doc_id", how="semi").iter_rows()}
    in_c = tokens.join(
        c.select(pl.col("doc_id").cast(tokens["doc_id"].dtype)).unique(), on="doc_id", how="semi"
    )
    n_tok = dict(in_c.group_by("doc_id").agg(pl.col("pos").max()).iter_rows())

    out: dict[tuple[int, ...], Context] = {}
    cols = [*key_cols, "_wpos", "token", "kl", "role", "activation", "kl_attribution", "_a"]
    cur: tuple[int, ...] | None = None
    toks: list[Tok] = []
    for row in w.select(cols).iter_rows():
        key = tuple(row[: len(key_cols)])
        wpos, token, kl, role, act, attr, a = row[len(key_cols) :]
        if key != cur:
            if cur is not None:
                out[cur] = _context(cur, toks, meta, n_tok, half)
            cur, toks = key, []
        tip = f"{token!r} pos {wpos} ({role}) KL {fmt(kl)}"
        if act is not None:
            tip += f" | act {fmt(act)} attr {fmt(attr)}"
        toks.append(Tok(visible(token), tip, a, wpos == key[-1]))
    if cur is not None:
        out[cur] = _context(cur, toks, meta, n_tok, half)
    return out


def _context(key: tuple[int, ...], toks: list[Tok], meta: dict, n_tok: dict, half: int) -> Context:
    doc_id, pos = key[-2], key[-1]
    doc, behaviour, text = meta.get(doc_id, (str(doc_id), None, ""))
    return Context(
        doc_id=doc_id,
        doc=doc,
        behaviour=behaviour if behaviour is not None else "none",
        text=text,
        pos=pos,
        toks=tuple(toks),
        cut_left=pos - half > 0,
        cut_right=pos + half < n_tok.get(doc_id, pos),
    )
