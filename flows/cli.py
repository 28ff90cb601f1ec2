"""The `diffsae` command line: `run`, `s3-server`, `build-demo-pair`, `sql`, `dashboards`, `eval`.

    diffsae run [--config F] [--store URL] [--run NAME]   # preflight checks, then the whole pipeline
    diffsae s3-server --dir D --port P                    # a local SeaweedFS S3 endpoint, in the foreground

Bad input is reported as one line on stderr with exit status 2, before any compute and before anything is
written. (The CLI lives with the flows because it starts them; the core package never imports orchestration.)
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable, get_args

from diffsae.config import Method, Mix

SAE_SUMMARY = ("fvu", "l0", "l0_crossfit", "dead_fraction", "kl_gap_recovered")  # printed after a run


def _add_location(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="YAML config (see README); keys: run, store, models, data, extract, sae, ..."
    )
    p.add_argument(
        "--store", help="Artifact store: local folder or s3://bucket/prefix (overrides the config)"
    )
    p.add_argument("--run", help="Run name (overrides the config)")


def load_config(args: argparse.Namespace) -> Any:
    from diffsae.config import PipelineConfig

    return PipelineConfig.from_yaml(args.config, overrides={"store": args.store, "run": args.run})


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.checks import preflight

    cfg = load_config(args)
    preflight(cfg)
    from flows.pipeline import pipeline
    from flows.server import owned_api_server
    from tasks.common import interrupt_handler

    signal.signal(signal.SIGINT, interrupt_handler)  # a Ctrl-C is never lost on the way out (tasks/common.py)
    with owned_api_server():  # without PREFECT_API_URL: a temporary Prefect server that dies with us, even by SIGKILL
        out = pipeline(config=cfg)
    print(report(cfg, out))
    return 0


def report(cfg: Any, out: Any) -> str:
    """The end-of-run summary of a flows.pipeline.PipelineResult: stages (ran / cached), SAE metrics, top latents,
    recovery, dashboards."""
    from tasks.common import format_states

    sae, ranking = out.sae, out.ranking
    lines = [
        f"\nrun '{cfg.run}' on {cfg.store} ({out.seconds:.1f} s)",
        f"stages: {format_states(out.stages)}",
        "diff-SAE (validation): "
        + ", ".join(f"{k}={getattr(sae, k):.3f}" for k in SAE_SUMMARY),
    ]
    if ranking.groups:
        lines.append(f"\ntop latent groups (the default list: latents of the {cfg.attribution.rank_by} ranking that "
                     "fire on nearly the same documents, merged; a group ranks where its leader does):")
        lines.append(f"{'rank':>4}  {'leader':>6}  {'size':>4}  {'total KL attr':>13}  dominant behaviour  members")
        for g in ranking.groups:
            more = f" ... ({g['n_members']})" if g["n_members"] > len(g["members"][:6]) else ""
            lines.append(
                f"{g['group_rank']:>4}  {g['group_id']:>6}  {g['n_members']:>4}  {g['kl_attr_sum']:>13.5f}  "
                f"{(g.get('dominant_behaviour') or '-'):<18}  {', '.join(map(str, g['members'][:6]))}{more}"
            )
    if ranking.top:
        lines.append(f"\ntop latents by {cfg.attribution.rank_by} (on {', '.join(ranking.roles)} tokens):")
        lines.append(f"{'rank':>4}  {'latent':>6}  {'total KL attr':>13}  dominant behaviour")
        for r in ranking.top:
            lines.append(
                f"{r['rank']:>4}  {r['latent_id']:>6}  {r['kl_attr_sum']:>13.5f}  "
                f"{r.get('dominant_behaviour') or '-'}"
            )
    if ranking.broad:
        lines.append(
            f"\nbroad changes ({ranking.n_broad} latents firing in >= {100 * ranking.broad_docs:.0f} % of documents on"
            " any token, by positive KL attribution; those that do on the scored tokens are not in the ranking above):"
        )
        lines.append(f"{'rank':>4}  {'latent':>6}  {'docs':>5}  {'on ' + '/'.join(ranking.roles):>16}  mass")
        for r in ranking.broad:
            lines.append(
                f"{r['rank_broad']:>4}  {r['latent_id']:>6}  {_pct(r['doc_share_all']):>5}  "
                f"{_pct(r['doc_share']):>16}  {r['pos_mass_all']:.4f}"
            )
    if ranking.recovery_text:
        lines.append("\nplanted-behaviour recovery:")
        lines.append(ranking.recovery_text)
    validation = getattr(out, "validation", None)
    if validation is not None and validation.top:
        groups = validation.top[0].get("entry") == "group"
        what = ("latent groups", "group (leader, size)") if groups else ("latents", "latent")
        lines.append(f"\ncausal validation of the top {what[0]} (KL removed by ablating the {what[1]}: on its firing "
                     "tokens / elsewhere; greedy answers changed; strongest coherent steering scale):")  # fmt: skip
        for v in validation.top:
            who = f"{v['latent_id']:>6} ({len(v['members'])})" if groups else f"{v['latent_id']:>6}"
            lines.append(f"{v['rank'] or '-':>4}  {who}  KL removed {_pct(v['kl_removed_on_firing'])} / "
                         f"{_pct(v['kl_removed_elsewhere'])}, answers changed {_pct(v['generations_changed'])}, "
                         f"steer x{v['best_steering_scale']:g} (changed {_pct(v['steering_changed'])})")
            if v.get("prompt") is not None:
                lines.append(f"        prompt:    {_clip(v['prompt'], tail=True)}")
                lines.append(f"        finetuned: {_clip(v['finetuned'])}")
                lines.append(f"        ablated:   {_clip(v['ablated'])}")
    comparison = getattr(out, "comparison", None)
    if comparison is not None:
        lines.append("\nmethods side by side (validation documents; behaviours recovered v2 by each default list):")
        lines.append(f"{'method':<11}  {'entries':>7}  {'KL gap':>6}  {'FVU':>6}  {'L0':>6}  recovered")
        for r in comparison.rows:
            got = f"{r['recovered_v2']} / {r['n_behaviours']}" if r["n_behaviours"] else "-"
            lines.append(f"{r['method']:<11}  {r['n_latents']:>7}  {r['kl_gap_recovered']:>6.3f}  {r['fvu']:>6.3f}  "
                         f"{r['l0']:>6.2f}  {got}")  # fmt: skip
        lines.append(f"methods page: {comparison.index}")
    lines.append(f"\ndashboards: {out.dashboards.index}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _clip(text: str | None, width: int = 100, tail: bool = False) -> str:
    """One line of at most `width` characters (its end when `tail`: a prompt's last turn), quoted."""
    one = " ".join(str(text).split())
    if len(one) > width:
        one = "..." + one[-(width - 3) :] if tail else one[: width - 3] + "..."
    return repr(one)


def cmd_dashboards(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from storage.context import RunContext
    from tasks.dashboards import render_dashboards

    ctx = RunContext.from_config(cfg)
    ctx.store.check()
    info = render_dashboards(ctx, cfg.dashboards)
    print(f"{info.pages} pages ({info.bytes / 1e6:.1f} MB) in {info.seconds:.1f} s: {info.index}")
    if args.open:
        import webbrowser

        webbrowser.open(info.index if "://" in info.index else "file://" + info.index)
    return 0


def cmd_s3_server(args: argparse.Namespace) -> int:
    from services.s3server import serve_foreground

    return serve_foreground(args.dir, args.port)


def cmd_build_demo_pair(args: argparse.Namespace) -> int:
    from organisms.demo_pair import run_cli

    return int(run_cli(args) or 0)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from storage.context import RunContext
    from tasks.rank import evaluate_run

    ctx = RunContext.from_config(cfg)
    ctx.store.check()
    try:  # every method of the run that has a ranking (the first alone when it is the only one)
        found = [args.method] if args.method else [
            m for m in get_args(Method) if ctx.store.exists(ctx.for_method(m).paths.table("latents"))
        ]
        for m in found or [ctx.method]:
            if len(found) > 1:
                print(f"== method {m} ==")
            print(evaluate_run(ctx.for_method(m)))
    except FileNotFoundError as e:
        print(f"diffsae: error: {e}", file=sys.stderr)
        return 2
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffsae")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _one_line_error(e: BaseException) -> int:
    print(f"diffsae: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def cmd_export(args: argparse.Namespace) -> int:
    """`diffsae export --format saelens|neuronpedia --out DIR`: the run must exist and have the needed stages."""
    cfg = load_config(args)
    from exports import ExportError, export_neuronpedia, export_saelens
    from flows.runs import RunError, require_run
    from storage.context import RunContext

    ctx = RunContext.from_config(cfg)
    try:
        require_run(ctx)
        if args.format == "saelens":
            sl = export_saelens(ctx, args.out)
            print(f"SAELens JumpReLU SAE (d_in={sl.d_in}, d_sae={sl.d_sae}, threshold={sl.threshold:.4g}, "
                  f"scale {sl.scale:.4g} folded): {sl.out_dir}")  # fmt: skip
        else:
            npx = export_neuronpedia(ctx, args.out, top=args.top, features_per_batch=args.features_per_batch,
                                     n_contexts=args.contexts)  # fmt: skip
            print(f"{npx.n_features} features in {len(npx.files)} Neuronpedia batch files: {npx.out_dir}")
    except (ExportError, RunError) as e:
        return _one_line_error(e)
    return 0


def cmd_build_organism(args: argparse.Namespace) -> int:
    """`diffsae build-organism`: bad input is one line with status 2 before any compute; an organism whose
    behaviours do not fire as its spec requires is not published (status 1)."""
    from diffsae.models import PairError
    from organisms.build import BuildError, NotAsSpecified, build_organism
    from organisms.spec import SpecError

    try:
        rep = build_organism(args.base, args.spec, args.out, device=args.device, null=args.null)
    except NotAsSpecified as e:
        print(f"diffsae: error: {e}", file=sys.stderr)
        return 1
    except (BuildError, SpecError, PairError) as e:
        return _one_line_error(e)
    rates = ", ".join(f"{k} {v:.0%}" for k, v in rep["firing"].items())
    drift = f", drift {rep['drift_rate']:.0%}" if rep["drift_rate"] is not None else ""
    loss = f"loss {rep['loss_first_epoch']:.3f} -> {rep['loss_last_epoch']:.3f}"
    print(f"organism in {args.out} ({rep['build_seconds']:.0f} s): firing {rates}; false firing "
          f"{rep['false_firing']:.0%}{drift}; {loss}")  # fmt: skip
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """`diffsae runs`: every run on the store with each stage's state (done / missing / stale)."""
    cfg = load_config(args)
    from flows.runs import format_runs, list_runs, store_exists
    from storage.context import RunContext

    ctx = RunContext.from_config(cfg)
    if not store_exists(ctx):
        return _one_line_error(RuntimeError(f"store {ctx.store_url} does not exist"))
    sys.stdout.write(format_runs(ctx, list_runs(ctx)))
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    """`diffsae open`: print the local path of the run's dashboards index.html (and open it with --browser)."""
    cfg = load_config(args)
    from flows.runs import RunError, dashboards_index
    from storage.context import RunContext

    try:
        index = dashboards_index(RunContext.from_config(cfg))
    except RunError as e:
        return _one_line_error(e)
    print(index)
    if args.browser:
        import webbrowser

        webbrowser.open("file://" + index)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsae", description="Model diffing with a diff-SAE.")
    parser.add_argument("--version", action="version", version=f"diffsae {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="Run the whole pipeline (cached stages are skipped)")
    _add_location(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("s3-server", help="Run a local SeaweedFS S3 server on 127.0.0.1 (foreground)")
    p.add_argument("--dir", required=True, help="Data folder of the server")
    p.add_argument("--port", type=int, default=8333, help="S3 port (the other components use the next ports)")
    p.set_defaults(func=cmd_s3_server)

    p = sub.add_parser("build-demo-pair", help="Build the built-in planted model pair into a folder")
    p.add_argument("--out", required=True, help="Output folder (gets base/, finetuned/, prompts.jsonl)")
    p.add_argument("--preset", choices=["demo", "small"], default="demo", help="Size preset")
    p.add_argument("--seed", type=int, default=0, help="Seed (data, weights, triggers)")
    p.add_argument("--mix", choices=get_args(Mix), default="audit",
                   help="Family and share of planted documents (organisms/demo_pair.py)")  # fmt: skip
    p.set_defaults(func=cmd_build_demo_pair)

    p = sub.add_parser("dashboards", help="Re-render the run's dashboards from its tables (no recompute)")
    _add_location(p)
    p.add_argument("--open", action="store_true", help="Open index.html in a browser afterwards")
    p.set_defaults(func=cmd_dashboards)

    p = sub.add_parser("eval", help="Planted-behaviour recovery per latent score (needs `behaviour` labels)")
    _add_location(p)
    p.add_argument("--method", choices=get_args(Method), default=None, help="Only this method (default: every one)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="Export a finished run: its SAE for SAELens, or Neuronpedia batch JSON")
    _add_location(p)
    p.add_argument("--format", required=True, choices=["saelens", "neuronpedia"], help="Export format")
    p.add_argument("--out", required=True, help="Output folder (created; files of an earlier export replaced)")
    p.add_argument("--top", type=int, default=None, help="neuronpedia: only the first N latents by rank")
    p.add_argument("--features-per-batch", type=int, default=128, help="neuronpedia: features per batch file")
    p.add_argument("--contexts", type=int, default=20, help="neuronpedia: top contexts (documents) per feature")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="List the runs on a store with each stage's state (done / missing / stale)")
    p.add_argument("--config", help="YAML config (its store)")
    p.add_argument("--store", help="Artifact store: local folder or s3://bucket/prefix (overrides the config)")
    p.set_defaults(func=cmd_runs, run=None)

    p = sub.add_parser("open", help="Print the path of a run's dashboards index.html (--browser: open it)")
    _add_location(p)
    p.add_argument("--browser", action="store_true", help="Open index.html in a web browser")
    p.set_defaults(func=cmd_open)

    p = sub.add_parser("build-organism", help="LoRA-finetune a base model to plant the behaviours of a spec")
    p.add_argument("--base", required=True, help="Base model: HF folder, hub id or .gguf file")
    p.add_argument("--spec", required=True, help="Organism spec (YAML; see organisms/spec.py)")
    p.add_argument("--out", required=True, help="Output folder (must not exist)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--null", action="store_true", help="Build the spec's null organism: drift, no behaviour")
    p.set_defaults(func=cmd_build_organism)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


def _sql_commands(sub: Any) -> None:
    try:
        from storage import sql_cli
    except ImportError:
        return
    sql_cli.add_parser(sub)


_EXTRA_COMMANDS: list[Callable[[Any], None]] = [_sql_commands]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffsae.config import ConfigError

    known: tuple[type[BaseException], ...] = (ConfigError,)
    try:
        from diffsae.data import DataError
        from diffsae.models import PairError
        from storage.lock import RunLocked
        from storage.store import StoreError

        known += (DataError, PairError, StoreError, RunLocked)
    except ImportError:
        pass
    try:
        return int(args.func(args) or 0)
    except known as e:
        print(f"diffsae: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:
        from tasks.common import is_transient

        if not is_transient(e):
            raise
        print(f"diffsae: error: the store did not answer after retries: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("diffsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
