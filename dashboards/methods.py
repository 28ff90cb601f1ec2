"""The methods comparison page of a run with several methods (`methods/index.html`): one row per method -- its
dictionary's validation figures and what its ranking recovered -- each linking to the method's own dashboards.
Autoescaped Jinja2, no script, relative links only (the page lives next to the methods' folders)."""

from __future__ import annotations

from typing import Any

import jinja2

from dashboards.plots import fmt

PAGE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{{ run }}: methods side by side</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}</style></head>
<body><h1>Run {{ run }}: methods side by side</h1>
<p>Same activations, same document split, same attribution, ranking and validation for every method; the KL gap
recovered and the reconstruction figures are on the validation documents, never trained on.</p>
<table id="methods"><thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for r in rows %}<tr><td><a href="{{ r.link }}">{{ r.method }}</a></td>{% for c in columns[1:] %}
<td>{{ r.cells[c] }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></body></html>
""")

COLUMNS = {  # header -> field of a methods table row
    "method": "method",
    "dictionary": "architecture",
    "entries": "n_latents",
    "k": "k",
    "KL gap recovered": "kl_gap_recovered",
    "FVU": "fvu",
    "L0": "l0",
    "entries that fire": "n_ranked",
    "behaviours recovered (v2, default list)": "recovered_v2",
}


def methods_page(run: str, rows: list[dict[str, Any]], links: dict[str, str]) -> str:
    """HTML of the comparison page; `rows` are rows of the `methods` table, `links` method -> its dashboards."""
    view = []
    for r in rows:
        cells = {h: fmt(r.get(f)) if isinstance(r.get(f), float) else r.get(f) for h, f in COLUMNS.items()}
        if r.get("n_behaviours"):
            cells["behaviours recovered (v2, default list)"] = f"{r['recovered_v2']} / {r['n_behaviours']}"
        view.append({"method": r["method"], "link": links[r["method"]], "cells": cells})
    return PAGE.render(run=run, columns=list(COLUMNS), rows=view)
