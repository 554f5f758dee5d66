"""The `asyncflow` command line: each command parses its arguments and delegates.

asyncflow validate CONFIG [--set key=value ...]   check a run config, print it resolved
asyncflow run CONFIG [--set key=value ...]        RL post-training (prints the run directory)
asyncflow run --resume RUN_DIR                     continue a run from its last checkpoint
asyncflow demo [--samples N]                       stream samples through the data store on Ray
"""

from __future__ import annotations

import argparse
import sys

import yaml

from asyncflow.config import load_config
from asyncflow.errors import AsyncFlowError, ConfigError


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from asyncflow.recipes.grpo import train
    from asyncflow.rundir import RunDir

    if args.resume:
        config = RunDir.open(args.resume).config(args.set)
    elif args.config:
        config = load_config(args.config, args.set)
    else:
        raise ConfigError("asyncflow run needs a CONFIG file or --resume RUN_DIR")
    summary = train(config, resume=args.resume, display=not args.quiet)
    print(yaml.safe_dump(summary, sort_keys=False), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from asyncflow.demo import run_demo

    result = run_demo(samples=args.samples, group_size=args.group_size)
    return 0 if result["trained"] == result["distinct"] == result["samples"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncflow", description="Asynchronous streaming RL post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a run config and print it with defaults filled in")
    validate.add_argument("config", help="path to a YAML run config")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    validate.set_defaults(func=_validate)
    run = sub.add_parser("run", help="RL post-training from a config (or --resume a run directory)")
    run.add_argument("config", nargs="?", help="path to a YAML run config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    run.add_argument("--quiet", action="store_true", help="no live display, only the final summary")
    run.set_defaults(func=_run)
    demo = sub.add_parser("demo", help="stream samples through the data store with Ray actors")
    demo.add_argument("--samples", type=int, default=4096, help="samples to stream (default 4096)")
    demo.add_argument("--group-size", type=int, default=8, help="samples per prompt (default 8)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AsyncFlowError as e:
        print(f"asyncflow {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
