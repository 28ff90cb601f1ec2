"""Stage 5 task: causal validation of the top entries -- ablate each from the finetuned model, add it to the base.

An entry is a latent group of the default list (`validation.entries: groups`, the default: its latents are ablated
and steered together) or a single latent of the ranking (`latents`, and runs without groups). For each of the first
`validation.top` entries: its top documents by the members' summed KL attribution (`latent_docs`), their prompts
(the tokens before the first assistant turn, from the documents' token roles; a document without one is cut after
the entry's first firing), each member's typical activation (a quantile of its `latent_tokens` activations), then
the core, `diffsae.validation.validate_latent` (KL removed by the ablation, ablated and steered greedy answers, the
strongest coherent steering scale). Writes `validation` and `validation_generations` (storage/schemas.py), logs
summary metrics to the SAE's MLflow run; `analysis/validation.json`, written last, is the stage's marker (also when
`top` is 0: the stage is skipped, no table is written). Keyed on the validation settings, the ranking key (hence
the SAE, activations and models) and the source of the stage and of the core.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pyarrow as pa
from prefect import task
from tqdm import tqdm

from diffsae import validation as core
from diffsae.config import ModelsConfig, ValidationConfig
from diffsae.data import Doc
from storage import activations as act
from storage import duck, schemas
from storage.context import RunContext
from tasks.attribute import load_sae
from tasks.common import IO_RETRY, STAGE_CACHE, code_version, read_marker, stage_key, write_marker
from tasks.models import MODEL_CACHE

TOP_REPORTED = 5  # entries listed in the stage's result (the CLI's end-of-run report)
TABLES = ("validation", "validation_generations")


class ValidationResult(NamedTuple):
    """The validation stage's summary (`analysis/validation.json`)."""

    key: str
    n_entries: int  # entries validated (0: the stage was skipped)
    top: list[dict[str, Any]]  # first TOP_REPORTED rows of `validation` + one prompt, finetuned, ablated answer
    seconds: float


def validation_key(cfg: ValidationConfig, rank_key: str) -> str:
    core_code = code_version(core.validate_latent, core.greedy_generate, core.ablate, core.ablation_kl)
    return stage_key("validation", validate, cfg.model_dump(), rank_key, core_code)


def validation_done(ctx: RunContext, key: str) -> ValidationResult | None:
    return read_marker(ctx.store, ctx.paths.marker("validation"), key, ValidationResult)


def prompt_tokens(doc: Doc, first_pos: int) -> list[int]:
    """The document up to its first assistant turn (the user-turn prefix, chat markup included); without an
    assistant turn, up to and including the latent's first firing token."""
    start = next((t for t, role in enumerate(doc.roles) if role == "assistant"), None)
    if start:
        return list(doc.token_ids[:start])
    return list(doc.token_ids[: max(first_pos + 1, 2)])


def _targets(ctx: RunContext, cfg: ValidationConfig, skip_first: int) -> tuple[list[dict[str, Any]], dict[int, Any]]:
    """The entries to validate and their top documents. An entry: latent_id (a group's leader), rank, entry kind,
    members and each member's typical activation; its documents (doc_id, first firing position of any member), by
    the members' summed attribution, best first. Groups: the first `top` of latent_groups (`cfg.entries` "groups"
    and the run has them). Latents: the top by narrow rank, then broad ones (rank NULL) by rank_broad when fewer
    narrow latents fire (a one-direction method's single entry fires nearly everywhere: it is broad)."""
    con = ctx.duck()
    views = duck.view_names(con)
    ld = "latent_docs" if "latent_docs" in views else (
        "(SELECT latent_id, doc_id, sum(kl_attribution) AS attr_sum FROM latent_tokens GROUP BY ALL)")  # fmt: skip
    q, top, n = float(cfg.activation_quantile), int(cfg.top), int(cfg.n_docs)
    groups = cfg.entries == "groups" and "latent_groups" in views
    if groups and con.execute("SELECT count(*) FROM latent_groups").fetchone()[0] == 0:
        groups = False
    # (entry id, entry rank, member latent_id, member order) of the entries to validate
    members = (
        f"""SELECT group_id AS eid, group_rank AS erank, NULL AS ebroad, latent_id, rank AS morder FROM latent_groups
            WHERE group_rank <= {top}"""
        if groups
        else f"""SELECT latent_id AS eid, rank AS erank, rank_broad AS ebroad, latent_id, 0 AS morder FROM latents
                 ORDER BY rank NULLS LAST, rank_broad NULLS LAST, latent_id LIMIT {top}"""
    )
    rows = con.execute(f"""
        WITH m AS ({members}),
        typ AS (SELECT latent_id, quantile_cont(activation, {q}) AS typical FROM latent_tokens
                WHERE latent_id IN (SELECT latent_id FROM m) GROUP BY latent_id)
        SELECT m.eid, m.erank, m.latent_id, typ.typical FROM m JOIN typ USING (latent_id)
        ORDER BY m.erank NULLS LAST, m.ebroad NULLS LAST, m.eid, m.morder, m.latent_id
        """).fetchall()
    entries: dict[int, dict[str, Any]] = {}
    kind = "group" if groups else "latent"
    for eid, erank, lid, typical in rows:
        head = {"latent_id": int(eid), "rank": None if erank is None else int(erank), "entry": kind}
        e = entries.setdefault(int(eid), {**head, "members": [], "typical": []})
        e["members"].append(int(lid))
        e["typical"].append(float(typical))
    docs_rows = con.execute(f"""
        WITH m AS ({members}),
        per AS (SELECT m.eid, ld.doc_id, sum(ld.attr_sum) AS attr FROM {ld} AS ld JOIN m USING (latent_id)
                GROUP BY m.eid, ld.doc_id),
        d AS (SELECT * FROM per QUALIFY row_number() OVER (PARTITION BY eid ORDER BY attr DESC, doc_id) <= {n})
        SELECT d.eid, d.doc_id, min(lt.pos) AS first_pos, any_value(d.attr) AS attr
        FROM d JOIN m USING (eid) JOIN latent_tokens AS lt ON lt.latent_id = m.latent_id AND lt.doc_id = d.doc_id
        WHERE lt.pos >= {int(skip_first)}
        GROUP BY ALL ORDER BY d.eid, attr DESC, d.doc_id""").fetchall()
    docs: dict[int, list[tuple[int, int]]] = {}
    for eid, doc_id, first_pos, _ in docs_rows:
        docs.setdefault(int(eid), []).append((int(doc_id), int(first_pos)))
    return list(entries.values()), docs


def validate(
    ctx: RunContext, cfg: ValidationConfig, models: ModelsConfig, skip_first: int, batch_tokens: int, key: str
) -> ValidationResult:
    """Ablate and steer each of the top latents; write the validation tables, then the marker."""
    done = validation_done(ctx, key)
    if done is not None:
        return done
    store, paths = ctx.store, ctx.paths
    t0 = time.perf_counter()
    store.delete(paths.marker("validation"))  # an earlier key's marker must not outlive its tables
    for name in TABLES:
        store.delete(paths.table(name))
    if cfg.top == 0:
        out = ValidationResult(key, 0, [], 0.0)
        write_marker(store, paths.marker("validation"), out)
        return out
    targets, top_docs = _targets(ctx, cfg, skip_first)
    docs = {d.doc_id: d for d in act.read_docs(store, paths, sorted({i for v in top_docs.values() for i, _ in v}))}
    pair = MODEL_CACHE.pair(ctx, models)
    sae = load_sae(ctx, pair.device)
    tok = pair.tokenizer
    eos = sorted({int(tok.eos_token_id)} | _config_eos(pair.finetuned)) if tok.eos_token_id is not None else []
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0])
    rows: list[dict[str, Any]] = []
    gens: list[dict[str, Any]] = []
    for t in tqdm(targets, desc="validation (ablate, steer)", unit="entry"):
        lid, picked = t["latent_id"], top_docs.get(t["latent_id"], [])
        prompts: list[tuple[int, list[int]]] = []
        for doc_id, first_pos in picked:
            p = prompt_tokens(docs[doc_id], first_pos)
            if len(prompts) < cfg.n_prompts and all(p != q for _, q in prompts):
                prompts.append((doc_id, p))
        res = core.validate_latent(
            pair.base, pair.finetuned, models.layer, sae, t["members"], t["typical"],
            [docs[d].token_ids for d, _ in picked], [p for _, p in prompts], pad_id=pad, eos_ids=eos,
            max_new_tokens=cfg.max_new_tokens, scales=cfg.scales, margin=cfg.coherence_margin,
            skip_first=skip_first, batch_tokens=batch_tokens,
        )  # fmt: skip
        best = res.scales[res.best_scale_index]
        rows.append({
            "latent_id": lid, "rank": t["rank"], "entry": t["entry"], "members": t["members"],
            "kl_removed_on_firing": res.kl_removed_on_firing,
            "kl_removed_elsewhere": res.kl_removed_elsewhere, "generations_changed": res.generations_changed,
            "best_steering_scale": best, "steering_changed": res.steering_changed, "n_docs": len(picked),
            "n_firing_tokens": res.n_firing_tokens, "n_prompts": len(prompts), "typical_activation": t["typical"][0],
            "steering_scales": res.scales, "steering_nll": res.steering_nll, "coherence_limit": res.coherence_limit,
        })  # fmt: skip
        for i, (doc_id, p) in enumerate(prompts):
            text = tok.decode(p, skip_special_tokens=False)
            variants = (("base", 0.0, res.steered[0][i]), ("base+steer", best, res.steered[res.best_scale_index][i]),
                        ("finetuned", 0.0, res.finetuned[i]), ("finetuned-ablated", 0.0, res.ablated[i]))  # fmt: skip
            for variant, scale, ids in variants:
                gens.append({"latent_id": lid, "doc_id": doc_id, "prompt": text, "variant": variant, "scale": scale,
                             "text": tok.decode(ids, skip_special_tokens=True)})  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schemas.VALIDATION)
    store.write_parquet(paths.table("validation"), table)
    gen_table = pa.Table.from_pylist(gens, schema=schemas.VALIDATION_GENERATIONS)
    store.write_parquet(paths.table("validation_generations"), gen_table)
    seconds = time.perf_counter() - t0
    publish_validation(ctx, table, seconds)
    out = ValidationResult(key, len(rows), report_rows(rows, gens), seconds)
    write_marker(store, paths.marker("validation"), out)  # last: marks the stage complete
    return out


def _config_eos(model: Any) -> set[int]:
    """The generation config's end-of-sequence ids (an int or a list), besides the tokenizer's."""
    e = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set() if e is None else {int(x) for x in (e if isinstance(e, (list, tuple)) else [e])}


def report_rows(rows: list[dict[str, Any]], gens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first TOP_REPORTED rows with one before/after pair: the first prompt whose answer the ablation changed
    (else the first prompt)."""
    keep = ("rank", "latent_id", "entry", "members", "kl_removed_on_firing", "kl_removed_elsewhere",
            "generations_changed", "best_steering_scale", "steering_changed")  # fmt: skip
    out = []
    for r in rows[:TOP_REPORTED]:
        by: dict[tuple[int, str], str] = {}
        prompts: list[tuple[int, str]] = []
        for g in gens:
            if g["latent_id"] == r["latent_id"]:
                by[(g["doc_id"], g["variant"])] = g["text"]
                if (g["doc_id"], g["prompt"]) not in prompts:
                    prompts.append((g["doc_id"], g["prompt"]))
        changed = [p for p in prompts if by[(p[0], "finetuned")] != by[(p[0], "finetuned-ablated")]]
        pick = (changed or prompts or [(None, None)])[0]
        out.append({k: r[k] for k in keep} | {"prompt": pick[1], "finetuned": by.get((pick[0], "finetuned")),
                                               "ablated": by.get((pick[0], "finetuned-ablated"))})  # fmt: skip
    return out


def publish_validation(ctx: RunContext, table: pa.Table, seconds: float) -> None:
    """Summary metrics of the validation table on the SAE's MLflow run (when it has one)."""
    try:
        run_id = ctx.store.read_json(ctx.paths.marker("sae")).get("mlflow_run_id")
    except FileNotFoundError:
        run_id = None
    if not run_id or not table.num_rows:
        return
    metrics = {"validation.n_entries": float(table.num_rows), "validation.seconds": seconds}
    for col in ("kl_removed_on_firing", "kl_removed_elsewhere", "generations_changed", "steering_changed"):
        values = np.asarray(table[col].to_numpy(zero_copy_only=False), dtype=np.float64)
        if np.isfinite(values).any():
            metrics[f"validation.mean_{col}"] = float(np.nanmean(values))
    scales = np.asarray(table["best_steering_scale"].to_numpy(zero_copy_only=False), dtype=np.float64)
    metrics["validation.steerable_fraction"] = float(np.mean(scales > 0))
    ctx.mlflow_experiment()
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)


@task(name="validate", cache_policy=STAGE_CACHE, **IO_RETRY)
def validate_task(
    ctx: RunContext, cfg: ValidationConfig, models: ModelsConfig, skip_first: int, batch_tokens: int,
    rank_key: str, key: str,
) -> ValidationResult:  # fmt: skip
    return validate(ctx, cfg, models, skip_first, batch_tokens, key)
