"""The `asyncflow` command line: each command parses its arguments and delegates.

asyncflow validate CONFIG [--set key=value ...]   check a run config, print it resolved
asyncflow run CONFIG [--set key=value ...]        RL post-training (prints the run directory)
asyncflow run --resume RUN_DIR                     continue a run from its last checkpoint
asyncflow run CONFIG --resume-if-exists            stable run directory; continue it if it exists
asyncflow export RUN_DIR OUT_DIR [--step N]        the trained policy as a Hugging Face directory
asyncflow demo [--samples N]                       stream samples through the data store on Ray
asyncflow trace RUN_DIR --sample P:S               one sample's life from the run's trace.json
asyncflow submit CONFIG --address URL [--set ...]  run it as a job on a Ray cluster (prints the job id)
                 [--resume RUN_DIR | --resume-if-exists]  ... continuing a run
asyncflow jobs status|logs|stop JOB_ID             follow a submitted job
asyncflow ctl VERB [VALUE] [--name NAME]           steer a live run: status, metrics, pause, resume,
                                                   set-staleness K, scale-rollout N, scale-reward N,
                                                   checkpoint, stop
asyncflow render-k8s CONFIG [-o DIR]               KubeRay, Redis and config manifests for Kubernetes
asyncflow report RUN_DIR [RUN_DIR ...] [-o OUT]    one HTML page of runs' metrics, side by side
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from asyncflow.config import load_config
from asyncflow.errors import AsyncFlowError, ConfigError, RunStopped


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    print(yaml.safe_dump(config.public(), sort_keys=False), end="")  # a password stays out
    need = config.resources_needed()
    plural = {"CPU": "CPUs", "GPU": "GPUs"}
    asks = [f"{v / 2**30:g} GiB" if k == "memory" else f"{v:g} {plural.get(k, k) if v != 1 else k}"
            for k, v in need.items()]  # fmt: skip
    print(f"# {args.config}: valid; its actors reserve {', '.join(asks)} on Ray", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from asyncflow.recipes.grpo import train
    from asyncflow.rundir import RunDir

    if args.resume and args.resume_if_exists:
        raise ConfigError("asyncflow run takes --resume RUN_DIR or CONFIG --resume-if-exists, not both")
    if args.resume:
        config = RunDir.open(args.resume).config(args.set)
    elif args.config:
        stable = ["run_dir_mode=stable"] if args.resume_if_exists else []
        config = load_config(args.config, [*args.set, *stable])
    else:
        raise ConfigError("asyncflow run needs a CONFIG file or --resume RUN_DIR")
    if config.flow.afm is not None:  # Action Flow Matching: continual supervised learning, not RL
        from asyncflow.recipes import afm

        if args.resume or args.resume_if_exists:
            raise ConfigError("an AFM run (flow.afm set) keeps no checkpoints; run it again without --resume")
        print(yaml.safe_dump(afm.train(config, display=not args.quiet), sort_keys=False), end="")
        return 0
    summary = train(
        config, resume=args.resume, resume_if_exists=args.resume_if_exists, display=not args.quiet
    )
    print(yaml.safe_dump(summary, sort_keys=False), end="")
    by = summary.get("stopped_by")
    if by in ("ctrl-c", "sigterm"):
        again = f"asyncflow run {args.config} --resume-if-exists" if args.resume_if_exists else (
            f"asyncflow run --resume {summary['run_dir']}")  # fmt: skip
        signal = "SIGTERM" if by == "sigterm" else "Ctrl-C"
        print(f"# {signal}: stopped at step {summary['stopped_at_step']} with a checkpoint; continue "
              f"with: {again}", file=sys.stderr)  # fmt: skip
        return 130 if by == "ctrl-c" else 143
    return 0


def _export(args: argparse.Namespace) -> int:
    from asyncflow.export import export

    out = export(args.run_dir, args.out_dir, args.step)
    print(out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from asyncflow.demo import run_demo

    result = run_demo(samples=args.samples, group_size=args.group_size)
    return 0 if result["trained"] == result["distinct"] == result["samples"] else 1


def _trace(args: argparse.Namespace) -> int:
    from asyncflow.lifeline import format_life, parse_sample, sample_life
    from asyncflow.rundir import RunDir

    run = RunDir.open(args.run_dir)
    if not run.trace_path.exists():
        raise ConfigError(
            f"{args.run_dir!r} has no trace.json: the run recorded no spans (trace.enabled: false, or it "
            "stopped before its first step); run it with trace.enabled=true"
        )
    prompt, sample = parse_sample(args.sample)
    print(format_life(sample_life(run.trace(), prompt, sample), args.sample))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from asyncflow import jobs

    job_id = jobs.submit(
        args.config, args.set, address=args.address, working_dir=args.working_dir,
        submission_id=args.submission_id, resume=args.resume, resume_if_exists=args.resume_if_exists,
    )  # fmt: skip
    config = load_config(args.config, args.set)
    if not config.output_dir.startswith("/"):
        print(
            f"# note: output_dir {config.output_dir!r} is relative: the run directory lands in the job's "
            "temporary working directory on the cluster; set output_dir to a shared absolute path to keep it",
            file=sys.stderr,
        )
    print(job_id)
    hint = f"--address {args.address} " if args.address else ""
    print(f"# follow it: asyncflow jobs logs {job_id} {hint}--follow", file=sys.stderr)
    print(
        f"# steer it:  asyncflow ctl status --name {config.dataplane.name}  (from the cluster)",
        file=sys.stderr,
    )
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from asyncflow import jobs

    if args.action == "status":
        state = (
            jobs.wait(args.job_id, args.address, args.wait)
            if args.wait
            else jobs.status(args.job_id, args.address)
        )
        print(yaml.safe_dump(state, sort_keys=False), end="")
        return 0 if not args.wait or state["status"] == "SUCCEEDED" else 1
    if args.action == "logs":
        for text in jobs.logs(args.job_id, args.address, follow=args.follow):
            print(text, end="", flush=True)
        return 0
    print("stopped" if jobs.stop(args.job_id, args.address) else "not running")
    return 0


# What `asyncflow ctl` does to a live run (asyncflow.control's verbs, as commands).
CTL_VERBS = ("status", "metrics", "pause", "resume", "set-staleness", "scale-rollout", "scale-reward",
             "checkpoint", "stop")  # fmt: skip


def _ctl(args: argparse.Namespace) -> int:
    import json

    from asyncflow.control import Client

    needs_value = args.verb in ("set-staleness", "scale-rollout", "scale-reward")
    if needs_value != (args.value is not None) and args.verb != "metrics":
        raise ConfigError(
            f"asyncflow ctl {args.verb} {'needs a number, e.g. 2' if needs_value else 'takes no value'}"
        )
    client = Client(args.name, address=args.address, wait_s=args.wait)
    if args.verb == "metrics":  # every step's line so far, then as they come, until the run ends
        for line in client.metrics(after_step=args.value or 0):
            print(json.dumps(line), flush=True)
        return 0
    verb = getattr(client, args.verb.replace("-", "_"))
    reply = verb(args.value) if needs_value else verb()
    print(yaml.safe_dump(reply, sort_keys=False), end="")
    return 0


def _render_k8s(args: argparse.Namespace) -> int:
    from pathlib import Path

    from asyncflow import k8s

    config = load_config(args.config, args.set)
    password = Path(args.redis_password_file).read_text().strip() if args.redis_password_file else None
    token = Path(args.ray_token_file).read_text().strip() if args.ray_token_file else None
    files = k8s.render(config, redis_password=password, ray_token=token)
    if args.no_secret:
        files.pop("secret.yaml", None)
    if args.output is None:  # one stream for `kubectl apply -f -`: the chosen Ray variant only
        other = "raycluster.yaml" if args.kind == "rayjob" else "rayjob.yaml"
        print("---\n".join(k8s.dump(docs) for name, docs in files.items() if name != other), end="")
        return 0
    out = Path(args.output)
    header = f"# Rendered by `asyncflow render-k8s {args.config}`: edit the config, not this.\n"
    k8s.write(files, out, header)  # secret.yaml: readable by its owner only
    print(
        f"# wrote {', '.join(files)} to {out}/ (apply rayjob.yaml or raycluster.yaml, not both)",
        file=sys.stderr,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from asyncflow import page

    print(page.write(args.run_dirs, args.output))
    return 0


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
    run.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="run_dir_mode: stable (the run directory is OUTPUT_DIR/RUN_NAME) and, if an earlier attempt "
        "made it, continue from its last checkpoint: a command that can be run again after any stop",
    )
    run.add_argument("--quiet", action="store_true", help="no live display, only the final summary")
    run.set_defaults(func=_run)
    export = sub.add_parser("export", help="a run's trained policy as a Hugging Face directory")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("out_dir", help="where to write the model, its tokenizer and chat template")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the newest whole one)")
    export.set_defaults(func=_export)
    report = sub.add_parser("report", help="a self-contained HTML page of one or more runs, side by side")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to show")
    report.add_argument(
        "-o", "--output", metavar="OUT.html", help="where to write it (default: RUN_DIR/report.html)"
    )
    report.set_defaults(func=_report)
    demo = sub.add_parser("demo", help="stream samples through the data store with Ray actors")
    demo.add_argument("--samples", type=int, default=4096, help="samples to stream (default 4096)")
    demo.add_argument("--group-size", type=int, default=8, help="samples per prompt (default 8)")
    demo.set_defaults(func=_demo)
    trace = sub.add_parser("trace", help="one sample's life in a run: admitted, generated, rewarded, trained")
    trace.add_argument("run_dir", help="the run directory (its trace.json)")
    trace.add_argument(
        "--sample",
        required=True,
        metavar="P:S",
        help="sample S of prompt P (as trained.jsonl names it), or P",
    )
    trace.set_defaults(func=_trace)

    _cluster_commands(sub)
    return parser


def _cluster_commands(sub: Any) -> None:
    """submit, jobs, ctl and render-k8s: a run on a Ray cluster or Kubernetes."""
    address_help = (
        "Ray dashboard (job server) address, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)"
    )
    submit = sub.add_parser(
        "submit", help="run a config as a job on an existing Ray cluster (prints the job id)"
    )
    submit.add_argument("config", help="path to a YAML run config, inside the working directory")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: .)")
    submit.add_argument("--submission-id", help="the job id to use (default: one Ray makes up)")
    again = submit.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run directory RUN_DIR (a path on the cluster)"
    )
    again.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="the job runs `asyncflow run CONFIG --resume-if-exists`: a stable run directory, continued "
        "from its last checkpoint when the job is submitted again",
    )
    submit.set_defaults(func=_submit)
    jobs = sub.add_parser("jobs", help="follow a submitted job: status, logs, stop")
    jobs.add_argument("action", choices=["status", "logs", "stop"])
    jobs.add_argument("job_id", help="the id `asyncflow submit` printed")
    jobs.add_argument("--address", help=address_help)
    jobs.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    jobs.add_argument("--wait", type=float, metavar="SECONDS", help="status: wait up to SECONDS for the end")
    jobs.set_defaults(func=_jobs)
    ctl = sub.add_parser("ctl", help="steer a live run (from any process of its Ray cluster)")
    ctl.add_argument("verb", choices=CTL_VERBS)
    ctl.add_argument(
        "value", nargs="?", type=int, help="set-staleness K, scale-rollout/-reward N (metrics: after step)"
    )
    ctl.add_argument("--name", default="asyncflow", help="the run's dataplane.name (default: asyncflow)")
    ctl.add_argument(
        "--address", help="Ray cluster address, HOST:6379 or ray://HOST:10001 (default: RAY_ADDRESS)"
    )
    ctl.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for the run to start")
    ctl.set_defaults(func=_ctl)
    render = sub.add_parser("render-k8s", help="Kubernetes manifests (KubeRay, Redis, config) of a config")
    render.add_argument("config", help="path to a YAML run config (its deploy.k8s section)")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    render.add_argument("-o", "--output", metavar="DIR", help="write one file per object kind into DIR")
    render.add_argument(
        "--kind", choices=["rayjob", "raycluster"], default="rayjob", help="stdout: which variant"
    )
    render.add_argument(
        "--redis-password-file", metavar="FILE", help="the Redis password (default: a random one)"
    )
    render.add_argument(
        "--ray-token-file", metavar="FILE", help="the Ray cluster's auth token (default: a random one)"
    )
    render.add_argument(
        "--no-secret", action="store_true", help="leave the Secrets out (create them with kubectl)"
    )
    render.set_defaults(func=_render_k8s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunStopped as e:  # SIGTERM, and no checkpoint within the grace period
        print(f"asyncflow {args.command}: {e}", file=sys.stderr)
        return 143
    except AsyncFlowError as e:
        cause = getattr(e, "cause", None)  # raised in a Ray worker: its own error, not Ray's stack
        print(
            f"asyncflow {args.command}: {cause if isinstance(cause, AsyncFlowError) else e}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:  # what to do next was said where it happened
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
