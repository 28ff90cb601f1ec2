"""Ground truth for the validation stage (issue 16): does ablating a planted behaviour's latent remove the
behaviour, and does steering the base with it make the behaviour appear?

What: runs the pipeline with default settings on the built-in planted pair (`demo` preset, audit mix, `--seed`;
stages already on the store are reused), then for each planted behaviour takes its best-ranked *capturing* latent
under the run's ranking (>= 80 % of its positive KL attribution in that behaviour's documents: storage/sql/
recovery.sql, docs/EVALUATION.md) and measures with greedy answers (`--max-new-tokens`, as the stage does):

- ablation (finetuned model, the latent's decoded contribution removed wherever it fires): the behaviour's rate on
  its held-out trigger prompts (the pair's prompts.jsonl rows with that label, up to the assistant turn) with and
  without the ablation, and the fraction of ordinary prompts whose greedy answer stays identical;
- steering (base model + scale x typical activation x decoder row): the behaviour's rate on ordinary prompts at
  the scale the validation stage kept for that latent (strongest coherent scale on its top documents), and at
  every scale of the sweep with its coherence NLL on those ordinary prompts.

A behaviour shows when organisms' own detector (`demo_corpus.has_signature`: its signature in the lower-cased
answer) fires. The same is measured for the group of ALL latents capturing the behaviour (ablated together;
steered with the sum of their typical contributions, scale chosen by the stage's criterion on the ordinary
prompts), and, as diagnostics chosen with the labels rather than by the ranking: every latent of the SAE (the
whole layer-L diff but the SAE's error: does the diff at layer L mediate the behaviour at all? ablation only)
and the 5 "decision" latents, most more active at the last prompt token (the assistant marker, where the finetune
picks its first answer token) of the behaviour's trigger prompts than of ordinary prompts. Targets (issue 16):
ablation drops the rate from >= 0.9 to <= 0.2 with >= 90 % of ordinary answers identical; steering makes the
behaviour appear on >= 50 % of ordinary prompts.

    nice .venv/bin/python bench/validate.py --store /tmp/valbench --seed 0 --out /tmp/valbench/validate-s0.json

A built organism instead of the demo pair: `--config examples/smollm2.yaml` runs that config (store and run from
the flags) and reads the behaviours from the organism's `spec.yaml` beside its prompts file; a behaviour shows when
`organisms.plant.fires` detects its effect in the answer (as the organism's build report does), answers are
`--max-new-tokens` long and decoded as the organism's format does. `--variants best,group` skips the costly
diagnostics ("decision", "all").

`--threads` (default 2) is also the thread count the pair is built with when it is not on the store yet (its
weights depend on it; tests and docs/EVALUATION.md use 2). On a machine shared with other CPU-bound jobs, rerun
with `--threads 1` once the stages are on the store: tiny generation steps on 2 oversubscribed threads crawl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

# run as a script, bench/ comes first on sys.path and bench/dashboards.py would shadow the dashboards package
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

from diffsae import validation as va  # noqa: E402
from organisms import demo_corpus as dc  # noqa: E402

BATCH = 64  # prompts per generation batch
TARGETS = {"rate_before": 0.9, "rate_after": 0.2, "identical": 0.9, "steered": 0.5}


def run_pipeline(store: str, run: str, seed: int, config: str | None) -> tuple[Any, Any]:
    """The default pipeline on the demo pair of `seed`, or on `config` (cached stages reused); returns (config,
    PipelineResult)."""
    import yaml

    from diffsae.config import PipelineConfig
    from flows.pipeline import pipeline

    raw = yaml.safe_load(Path(config).read_text()) if config else {"demo": {"seed": seed}}
    cfg = PipelineConfig.from_dict({**raw, "run": run, "store": store})
    return cfg, pipeline(config=cfg)


class Planted(NamedTuple):
    trigger: str
    signature: str
    shows: Callable[[str], bool]  # does an answer show the behaviour


class DemoFormat(NamedTuple):
    """The built-in pair's answers: stop at end of text, decode without special tokens (organisms' Format's API)."""

    tokenizer: Any

    def answer_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]


def demo_planted(ctx: Any, cfg: Any) -> tuple[Any, dict[str, Planted], Callable[[Any], Any]]:
    """(models, behaviours, the answer format given the tokenizer) of the built-in pair."""
    from tasks import pair as pr

    pair_done = pr.demo_pair_done(ctx, pr.demo_key(cfg.demo))
    models, _ = pr.resolved_inputs(cfg, pair_done)
    plants = {p["label"]: p for p in ctx.store.read_json(f"{pair_done.url}/demo_pair.json")["planted"]}
    out = {label: Planted(p["trigger"], p["signature"],
                          lambda a, p=p: dc.has_signature(a, SimpleNamespace(signature=p["signature"])))
           for label, p in plants.items()}  # fmt: skip
    return models, out, DemoFormat


def organism_planted(cfg: Any) -> tuple[Any, dict[str, Planted], Callable[[Any], Any]]:
    """(models, behaviours, the answer format given the tokenizer) of a built organism: its spec beside its prompts
    file, its format (chat or text) from its report."""
    from organisms.plant import Format, fires
    from organisms.spec import load_spec

    folder = Path(cfg.data.path).parent
    spec = load_spec(folder / "spec.yaml")
    chat = json.loads((folder / "report.json").read_text())["format"] == "chat"
    out = {b.name: Planted(b.trigger.kind, b.effect.text or b.effect.style or b.effect.kind,
                           lambda a, e=b.effect: fires(e, a)) for b in spec.behaviours}  # fmt: skip
    return cfg.models, out, lambda tok: Format(chat, tok)


def capturing(con: Any, share: float = 0.8) -> dict[str, list[tuple[int, int]]]:
    """Per planted behaviour, its capturing latents as (rank, latent_id), best rank first (recovery.sql's rule)."""
    from storage import ranking

    mass = ranking.render(ranking.load_sql("behaviour_mass.sql"), latent_docs="latent_docs", docs="docs")
    rows = con.execute(f"""
        WITH mass AS ({mass})
        SELECT m.behaviour, l.rank, l.latent_id FROM mass AS m JOIN latents AS l USING (latent_id)
        WHERE l.rank IS NOT NULL AND l.pos_mass > 0 AND m.pos_mass / l.pos_mass >= {share}
        ORDER BY m.behaviour, l.rank""").fetchall()
    out: dict[str, list[tuple[int, int]]] = {}
    for behaviour, rank, lid in rows:
        out.setdefault(behaviour, []).append((int(rank), int(lid)))
    return out


def best_entries(con: Any) -> dict[str, tuple[int, list[int]]]:
    """Per planted behaviour, the default list's best-ranked entry that recovers it under recovery v2 (a latent
    group: >= 80 % of its members' positive attribution in the behaviour's held-out documents, firing in >= 50 % of
    them): (group rank, members, leader first)."""
    rows = con.execute("""
        SELECT r.behaviour, r.best_rank_v2, g.latent_id FROM recovery AS r
        JOIN latent_groups AS g ON g.group_rank = r.best_rank_v2
        WHERE r.score = 'groups' AND r.best_rank_v2 IS NOT NULL
        ORDER BY r.behaviour, g.rank""").fetchall()
    out: dict[str, tuple[int, list[int]]] = {}
    for behaviour, rank, lid in rows:
        out.setdefault(behaviour, (int(rank), []))[1].append(int(lid))
    return out


def typical(con: Any, ids: list[int], q: float) -> list[float]:
    rows = dict(con.execute(f"""SELECT latent_id, quantile_cont(activation, {q}) FROM latent_tokens
                                WHERE latent_id IN ({",".join(map(str, ids))}) GROUP BY 1""").fetchall())
    return [float(rows[i]) for i in ids]


def generate(model: Any, layer: int, prompts: list[list[int]], fmt: Any, n: int, edit_for: Any = None,
             partner: Any = None) -> list[list[int]]:  # fmt: skip
    """`va.greedy_generate` in batches of BATCH prompts; `edit_for(n)` builds the edit of a batch of n rows."""
    out: list[list[int]] = []
    for b0 in range(0, len(prompts), BATCH):
        batch = prompts[b0 : b0 + BATCH]
        edit = edit_for(len(batch)) if edit_for else None
        out += va.greedy_generate(model, layer, batch, n, fmt.eos_ids(), fmt.tokenizer.pad_token_id, edit=edit,
                                  partner=partner)  # fmt: skip
    return out


def rate(answers: list[str], plant: Planted) -> float:
    return sum(plant.shows(a) for a in answers) / max(len(answers), 1)


def measure(pair: Any, layer: int, sae: Any, ids: list[int], acts: list[float], triggers: list[list[int]],
            ordinary: list[list[int]], steer_prompts: list[list[int]], plant: Planted, scales: list[float],
            kept_scale: float | None, margin: float, n_new: int, fmt: Any) -> dict[str, Any]:  # fmt: skip
    """Ablation and steering figures of one latent group (module docstring); `fmt` stops and decodes answers."""

    def text(g: list[int]) -> str:
        return fmt.answer_text(g)

    def ablated(prompts: list[list[int]]) -> list[list[int]]:
        return generate(pair.finetuned, layer, prompts, fmt, n_new, lambda _: va.ablation_edit(sae, ids), pair.base)

    ft_trig = [text(g) for g in generate(pair.finetuned, layer, triggers, fmt, n_new)]
    abl_trig = [text(g) for g in ablated(triggers)]
    ft_ord, abl_ord = generate(pair.finetuned, layer, ordinary, fmt, n_new), ablated(ordinary)
    vec = va.steering_vector(sae, ids, acts)
    sweep = []
    for s in scales:
        gens = generate(pair.base, layer, steer_prompts, fmt, n_new,
                        lambda n, s=s: va.steering_edit(vec, torch.full((n,), float(s))))  # fmt: skip
        nll = va.coherence_nll(pair.base, pair.finetuned, steer_prompts, gens, fmt.tokenizer.pad_token_id)[0]
        sweep.append({"scale": s, "rate": rate([text(g) for g in gens], plant), "coherence_nll": nll,
                      "examples": [text(g) for g in gens[:3]]})  # fmt: skip
    chosen = va.choose_scale(scales, [x["coherence_nll"] for x in sweep], sweep[0]["coherence_nll"], margin)
    kept = kept_scale if kept_scale is not None else scales[chosen]
    at_kept = next(x for x in sweep if x["scale"] == kept)
    coherent = [x for x in sweep if x["coherence_nll"] <= sweep[0]["coherence_nll"] + margin]
    return {
        "latents": ids, "rate_finetuned": rate(ft_trig, plant), "rate_ablated": rate(abl_trig, plant),
        "ordinary_identical": sum(a == b for a, b in zip(ft_ord, abl_ord)) / max(len(ordinary), 1),
        "rate_finetuned_ordinary": rate([text(g) for g in ft_ord], plant),
        "steering_scale": kept, "rate_steered": at_kept["rate"],
        "best_coherent_rate": max(x["rate"] for x in coherent), "sweep": sweep,
        "examples": {"finetuned": ft_trig[:3], "ablated": abl_trig[:3], "steered": at_kept["examples"]},
    }  # fmt: skip


@torch.no_grad()
def last_token_acts(pair: Any, layer: int, sae: Any, prompts: list[list[int]]) -> torch.Tensor:
    """Mean SAE activations [F] of diff = h_ft - h_base at the last token of each prompt."""
    from diffsae.hooks import read_residual

    total = torch.zeros(sae.n_latents)
    for b0 in range(0, len(prompts), BATCH):
        ids_BT, mask_BT, pos_BT = va.left_padded(prompts[b0 : b0 + BATCH], pair.tokenizer.pad_token_id, pair.device)
        h = []
        for model in (pair.base, pair.finetuned):
            with read_residual(model, layer) as cap:
                model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT)
            h.append(cap.value[:, -1].float())
        total += sae.encode(h[1] - h[0]).sum(0).cpu()
    return total / max(len(prompts), 1)


def evaluate(store: str, run: str, seed: int, config: str | None, n_ordinary: int, n_steer: int, n_new: int,
             variants: set[str], extra_groups: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    from storage import activations as act
    from storage.context import RunContext
    from tasks.attribute import load_sae
    from tasks.models import MODEL_CACHE
    from tasks.validate import prompt_tokens

    t0 = time.perf_counter()
    cfg, out = run_pipeline(store, run, seed, config)
    pipeline_s = time.perf_counter() - t0
    ctx = RunContext.from_config(cfg)
    models, plants, make_format = organism_planted(cfg) if config else demo_planted(ctx, cfg)
    pair = MODEL_CACHE.pair(ctx, models)
    fmt = make_format(pair.tokenizer)
    sae = load_sae(ctx, pair.device)
    con = ctx.duck()
    caps = capturing(con)
    views = con.execute("SHOW TABLES").fetchnumpy()["name"].tolist()
    entries = best_entries(con) if "latent_groups" in views and "recovery" in views else {}
    checked = {(r["entry"], r["latent_id"]): r for r in con.execute("SELECT * FROM validation").to_arrow_table()
               .to_pylist()} if "validation" in views else {}  # fmt: skip
    named = {}  # named latent groups (e.g. one the validation stage flagged): their members, leader first
    for gid in extra_groups:
        ids = [int(i) for (i,) in con.execute(f"""SELECT latent_id FROM latent_groups WHERE group_id = {int(gid)}
                                                  ORDER BY rank""").fetchall()]
        if ids:
            named[int(gid)] = ids
    docs = act.read_docs(ctx.store, ctx.paths)
    ordinary = [prompt_tokens(d, 0) for d in docs if d.behaviour == "none"][:n_ordinary]
    v = cfg.validation
    result: dict[str, Any] = {"seed": seed, "config": config, "run": run, "pipeline_seconds": pipeline_s,
                              "validation_seconds": out.validation.seconds, "variants": sorted(variants),
                              "behaviours": {}}  # fmt: skip
    for label, plant in sorted(plants.items()):
        triggers = [prompt_tokens(d, 0) for d in docs if d.behaviour == label]
        group = caps.get(label, [])
        row: dict[str, Any] = {"trigger": plant.trigger, "signature": plant.signature, "n_triggers":
                               len(triggers), "n_capturing": len(group)}  # fmt: skip
        t = time.perf_counter()
        common = (triggers, ordinary, ordinary[:n_steer], plant, v.scales)
        q, margin, L = v.activation_quantile, v.coherence_margin, models.layer
        if "entry" in variants and label in entries:
            rank, ids = entries[label]
            kept = checked.get(("group", ids[0]), {}).get("best_steering_scale")
            row["entry"] = {"rank": rank, **measure(pair, L, sae, ids, typical(con, ids, q), *common, kept, margin,
                                                    n_new, fmt)}  # fmt: skip
        if group and "best" in variants:
            rank, lid = group[0]
            kept = checked.get(("latent", lid), {}).get("best_steering_scale")
            best = measure(pair, L, sae, [lid], typical(con, [lid], q), *common, kept, margin, n_new, fmt)
            row["best"] = {"rank": rank, **best}
        if group:
            if "group" in variants:
                ids = [i for _, i in group]
                row["group"] = measure(pair, L, sae, ids, typical(con, ids, q), *common, None, margin, n_new, fmt)
            if "all" in variants:
                every = list(range(sae.n_latents))
                row["all"] = measure(pair, L, sae, every, [0.0] * len(every), *common[:4], [0.0], 0.0, margin, n_new,
                                     fmt)  # fmt: skip
            if "decision" in variants:
                gap = last_token_acts(pair, L, sae, triggers) - last_token_acts(pair, L, sae, ordinary)
                dec = [int(i) for i in gap.topk(5).indices]
                row["decision"] = measure(pair, L, sae, dec, typical(con, dec, q), *common, None, margin, n_new,
                                          fmt)  # fmt: skip
        for gid, ids in named.items():
            row[f"group:{gid}"] = measure(pair, L, sae, ids, typical(con, ids, q), *common, None, margin, n_new, fmt)
        row["seconds"] = time.perf_counter() - t
        result["behaviours"][label] = row
        print(f"== {label}: " + json.dumps({k: row.get("entry", row.get("best", {})).get(k) for k in
              ("rank", "rate_finetuned", "rate_ablated", "ordinary_identical", "steering_scale", "rate_steered")}),
              flush=True)  # fmt: skip
    return result


def table(res: dict[str, Any]) -> str:
    """Markdown: one row per behaviour and variant (the default list's best capturing entry, the best-ranked
    capturing latent, all capturing latents, the decision latents, every latent)."""
    lines = ["| behaviour | latent(s) | rate on triggers: finetuned -> ablated | ordinary answers identical "
             "| steering scale | rate on ordinary: steered (best coherent) | target met |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, row in res["behaviours"].items():
        for kind in ("entry", "best", "group", "decision", "all", *(k for k in row if k.startswith("group:"))):
            m = row.get(kind)
            if m is None and (kind not in ("entry", "best") or kind not in res.get("variants", (kind,))):
                continue
            if m is None:
                what = "no capturing group (v2)" if kind == "entry" else "no capturing latent"
                lines.append(f"| {label} | {what} | | | | | no |")
                continue
            who = {"entry": f"group {m['latents'][0]} (group rank {m.get('rank')}, {len(m['latents'])} latents)",
                   "best": f"{m['latents'][0]} (rank {m.get('rank')})", "group": f"all {len(m['latents'])} capturing",
                   "decision": "decision: " + ", ".join(map(str, m["latents"])), "all": "every latent"}.get(
                kind, f"group {kind[6:]} ({len(m['latents'])} latents, named)")
            ok_abl = (m["rate_finetuned"] >= TARGETS["rate_before"] and m["rate_ablated"] <= TARGETS["rate_after"]
                      and m["ordinary_identical"] >= TARGETS["identical"])  # fmt: skip
            ok_steer = m["rate_steered"] >= TARGETS["steered"]
            lines.append(f"| {label} | {who} | {m['rate_finetuned']:.2f} -> {m['rate_ablated']:.2f} "
                         f"| {m['ordinary_identical']:.2f} | {m['steering_scale']:g} | {m['rate_steered']:.2f} "
                         f"({m['best_coherent_rate']:.2f}) | ablation {'yes' if ok_abl else 'no'}, "
                         f"steering {'yes' if ok_steer else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="Store of the run (the demo pair is built there once)")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the built-in pair")
    ap.add_argument("--config", help="A run config on a built organism (its spec.yaml beside data.path) instead")
    ap.add_argument("--variants", default="entry,best,group,decision,all", help="Latent sets measured per behaviour")
    ap.add_argument("--groups", type=int, nargs="*", default=[], help="Also measure these latent groups (group ids)")
    ap.add_argument("--n-ordinary", type=int, default=200, help="Ordinary prompts for the identical-answer check")
    ap.add_argument("--n-steer", type=int, default=100, help="Ordinary prompts the steering is measured on")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: as the demo pair is built in tests)")
    ap.add_argument("--out", help="Write the full results (with example answers) as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from flows.server import owned_api_server

    with owned_api_server():  # Prefect's temporary server ends with this process, however it ends
        res = evaluate(args.store, args.run, args.seed, args.config, args.n_ordinary, args.n_steer,
                       args.max_new_tokens, set(args.variants.split(",")), tuple(args.groups))  # fmt: skip
    res["seconds"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"\npipeline {res['pipeline_seconds']:.0f} s (validation stage {res['validation_seconds']:.0f} s), "
          f"total {res['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
