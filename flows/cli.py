"""The `diffsae` command line: `run`, `s3-server`, `build-demo-pair`, `sql`, `dashboards`, `eval`.

    diffsae run [--config F] [--store URL] [--run NAME]   # preflight checks, then the whole pipeline
    diffsae s3-server --dir D --port P                    # a local SeaweedFS S3 endpoint, in the foreground

Bad input is reported as one line on stderr with exit status 2, before any compute and before anything is
written. (The CLI lives with the flows because it starts them; the core package never imports orchestration.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def _add_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see README); keys: run, store, models, data, extract, sae, ...")
    p.add_argument("--store", help="Artifact store: local folder or s3://bucket/prefix (overrides the config)")
    p.add_argument("--run", help="Run name (overrides the config)")


def load_config(args: argparse.Namespace) -> Any:
    from diffsae.config import PipelineConfig

    return PipelineConfig.from_yaml(args.config, overrides={"store": args.store, "run": args.run})


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.checks import preflight
    from tasks.common import telemetry_off

    telemetry_off()
    cfg = load_config(args)
    preflight(cfg)
    from flows.pipeline import pipeline

    out = pipeline(config=cfg)
    from tasks.common import format_states

    print(f"\nrun '{cfg.run}' on {cfg.store} ({out['seconds']:.1f} s): {format_states(out['stages'])}")
    for line in out.get("report", []):
        print(line)
    return 0


def cmd_s3_server(args: argparse.Namespace) -> int:
    from storage.s3server import serve_foreground

    return serve_foreground(args.dir, args.port)


def cmd_build_demo_pair(args: argparse.Namespace) -> int:
    from diffsae.demo_pair import run_cli

    return int(run_cli(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsae", description="Model diffing with a diff-SAE.")
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
    p.add_argument("--mix", choices=["audit", "easy"], default="audit", help="Share of planted documents")
    p.set_defaults(func=cmd_build_demo_pair)

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
        from storage.store import StoreError

        known += (DataError, PairError, StoreError)
    except ImportError:
        pass
    try:
        return int(args.func(args) or 0)
    except known as e:
        print(f"diffsae: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
