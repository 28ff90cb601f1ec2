"""Histograms for the dashboards: binned with polars, laid out as SVG geometry that the templates draw.

Nothing here emits markup. `histograms` bins many groups at once (one latent per group) with vectorised polars
ops; `svg_histogram` turns one histogram into bar rectangles and axis labels (numbers only) that
`templates/macros.html` renders as inline SVG, so any text still goes through Jinja's autoescaping.

    hists = histograms(latent_tokens, key="latent_id", value="kl_attribution", bins=40)
    plot = svg_histogram(hists[17], x_title="KL attribution")
"""

from __future__ import annotations

import math
from typing import NamedTuple

import polars as pl


class Hist(NamedTuple):
    """Equal-width bins over [lo, hi]; `counts[i]` covers [lo + i*w, lo + (i+1)*w)."""

    counts: tuple[int, ...]
    lo: float
    hi: float


class Bar(NamedTuple):
    x: float
    y: float
    w: float
    h: float
    tip: str  # "[lo, hi): n" shown as the bar's SVG <title>


class SvgPlot(NamedTuple):
    width: int
    height: int
    left: int  # plot area origin (x) and bottom (y)
    bottom: int
    bars: tuple[Bar, ...]
    x_lo: str
    x_hi: str
    y_max: str
    x_title: str
    y_title: str
    zero_x: float | None  # x of value 0 when it lies strictly inside (lo, hi)


def fmt(x: float | int | None) -> str:
    """Compact number: 3 significant digits, integers as-is, None as an em dash."""
    if x is None:
        return "\u2014"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def histograms(df: pl.DataFrame, key: str, value: str, bins: int = 40) -> dict[int, Hist]:
    """One histogram of `value` per `key` group, each over the group's own [min, max] (vectorised).

    Non-finite and null values are left out.
    """
    v = pl.col(value).cast(pl.Float64)
    df = df.filter(v.is_finite())
    if df.height == 0:
        return {}
    stats = df.group_by(key).agg(v.min().alias("_lo"), v.max().alias("_hi"))
    span = pl.col("_hi") - pl.col("_lo")
    binned = (
        df.select(key, v.alias("_v"))
        .join(stats, on=key)
        .with_columns(
            pl.when(span > 0)
            .then(((pl.col("_v") - pl.col("_lo")) / span * bins).floor().clip(0, bins - 1))
            .otherwise(0)
            .cast(pl.Int32)
            .alias("_b")
        )
        .group_by(key, "_b")
        .agg(pl.len().alias("_n"))
    )
    counts: dict[int, list[int]] = {}
    for k, b, n in binned.iter_rows():
        counts.setdefault(k, [0] * bins)[b] = n
    return {
        k: Hist(tuple(counts[k]), float(lo), float(hi))
        for k, lo, hi in stats.iter_rows()
        if lo is not None and k in counts
    }


def histogram(values: pl.Series, bins: int = 40) -> Hist | None:
    """Histogram of one series (None when it has no non-null values)."""
    df = pl.DataFrame({"_k": pl.Series([0] * values.len(), dtype=pl.Int32), "_x": values})
    return histograms(df, "_k", "_x", bins).get(0)


def svg_histogram(
    h: Hist,
    x_title: str,
    log_y: bool = False,
    width: int = 560,
    height: int = 190,
) -> SvgPlot:
    """Bar geometry for `h` in a width x height SVG (log_y: bar height ~ log1p(count))."""
    left, right, top, bottom = 44, 10, 8, height - 36
    pw, ph = width - left - right, bottom - top
    n = len(h.counts)
    scale = (lambda c: math.log1p(c)) if log_y else (lambda c: float(c))
    top_val = max((scale(c) for c in h.counts), default=0.0) or 1.0
    step = (h.hi - h.lo) / n if n else 0.0
    bars = []
    for i, c in enumerate(h.counts):
        if c == 0:
            continue
        bh = ph * scale(c) / top_val
        tip = f"[{fmt(h.lo + i * step)}, {fmt(h.lo + (i + 1) * step)}): {c}"
        bars.append(
            Bar(round(left + i * pw / n, 2), round(bottom - bh, 2), round(pw / n, 2), round(bh, 2), tip)
        )
    zero_x = None
    if h.lo < 0 < h.hi:
        zero_x = round(left + pw * (0 - h.lo) / (h.hi - h.lo), 2)
    return SvgPlot(
        width=width,
        height=height,
        left=left,
        bottom=bottom,
        bars=tuple(bars),
        x_lo=fmt(h.lo),
        x_hi=fmt(h.hi),
        y_max=fmt(max(h.counts, default=0)),
        x_title=x_title,
        y_title="count (log scale)" if log_y else "count",
        zero_x=zero_x,
    )
