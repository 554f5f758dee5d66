"""The `asyncflow` command line: each command parses its arguments and delegates.

asyncflow validate CONFIG [--set key=value ...]   check a run config, print it resolved
asyncflow demo [--samples N]                       stream samples through the data store on Ray
"""

from __future__ import annotations

import argparse
import sys

import yaml

from asyncflow.errors import AsyncFlowError


def _validate(args: argparse.Namespace) -> int:
    from asyncflow.config import load_config

    config = load_config(args.config, args.set)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
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
