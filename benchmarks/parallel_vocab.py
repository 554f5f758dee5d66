"""Vocab-parallel log-probs: peak memory and time of one forward + backward of the per-token
log-probs and entropies from an LM head, the whole logits against the vocabulary in K pieces.

Methods, for each vocabulary size V (N tokens, hidden size H, float32, temperature 1):
- dense: the trainer's whole-logits path, hidden @ W^T then asyncflow.algorithms'
  token_logprobs and entropy, autograd through all of it;
- K=1: services.parallelism.vocab.vocab_parallel_logprobs with `chunk` tokens at a time and
  the whole vocabulary per chunk (token chunking alone);
- K=2/4/8: the same with the vocabulary in K pieces on this one rank, merged by online softmax.

How memory is measured: each configuration runs in a fresh child process with 1 torch thread,
which allocates the inputs (hidden, weight, targets, the upstream gradients), runs the method
once on a tiny problem (so that lazy initialisation is not counted), reads its resident set size
(RSS, /proc/self/statm), runs forward + backward once, then reads its peak RSS (getrusage
ru_maxrss). `peak MiB` is peak minus the RSS before the pass: what the pass itself needed,
including the weight's gradient (V x H) and d(hidden) (N x H), which every method must produce
(`floor MiB`). glibc serves tensors over 32 MiB from mmap and returns them on free, so the peak
follows the live tensors; smaller ones come from the heap. Differences under ~20 MiB are noise.
`in flight MiB` is analytic: one float32 buffer of the logits that exist at once (N x V dense,
chunk x ceil(V / K) here; the code holds two such buffers at a time, autograd several).
`ms` is that one pass on a shared 2-core CPU (no repeat; not a GPU figure). Errors are the max
absolute difference to dense of the log-probs and entropies (fwd) and of d(hidden) (grad).

    .venv/bin/python benchmarks/parallel_vocab.py --json docs/bench-parallel-vocab.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / MIB


def _inputs(vocab: int, tokens: int, hidden: int) -> tuple:
    """hidden (N, H), weight (V, H) with logits of std ~2, targets (N,), upstream grads (N,) x 2:
    made in place, so that no temporary raises the peak before the pass."""
    import torch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).mul_(2 / math.sqrt(hidden)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, targets, torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)


def _run(method: str, shards: int, chunk: int, h, w, targets) -> tuple:
    from asyncflow.algorithms.logprobs import entropy, token_logprobs
    from services.parallelism.vocab import vocab_parallel_logprobs

    if method == "dense":
        logits = (h @ w.T)[None]  # (1, N, V)
        return token_logprobs(logits, targets[None])[0], entropy(logits)[0]
    return vocab_parallel_logprobs(h, w, targets, chunk_tokens=chunk, shards=shards)


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    method, shards, chunk = spec["method"], spec["shards"], spec["chunk"]
    small = _inputs(64, 16, 8)  # warm-up: the same code on a tiny problem
    logp, ent = _run(method, shards, min(chunk, 8), *small[:3])
    (logp * small[3] + ent * small[4]).sum().backward()
    del small, logp, ent
    h, w, targets, a, b = _inputs(spec["vocab"], spec["tokens"], spec["hidden"])
    before = rss_mib()
    start = time.perf_counter()
    logp, ent = _run(method, shards, chunk, h, w, targets)
    (logp * a + ent * b).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert h.grad is not None
    out = {**spec, "peak_mib": peak - before, "rss_before_mib": before, "ms": 1000 * seconds}
    reference = Path(spec["reference"])
    if method == "dense":
        torch.save({"logp": logp.detach(), "ent": ent.detach(), "dh": h.grad}, reference)
    elif reference.exists():
        ref = torch.load(reference)
        out["err_fwd"] = max((logp - ref["logp"]).abs().max().item(), (ent - ref["ent"]).abs().max().item())
        out["err_grad"] = (h.grad - ref["dh"]).abs().max().item()
    return out


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"child {spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    vocabs: tuple[int, ...] = (32768, 65536, 131072, 262144),
    tokens: int = 1024,
    hidden: int = 512,
    shards: tuple[int, ...] = (1, 2, 4, 8),
    chunk: int = 512,
) -> list[dict]:
    """One row per (vocabulary, method): dense, then `chunk`-token chunks with each K in `shards`.
    1024 tokens by default: dense at 2048 x 262144 peaks near 14 GiB and takes minutes here."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            reference = str(Path(tmp) / f"dense-{vocab}.pt")
            base = {
                "vocab": vocab,
                "tokens": tokens,
                "hidden": hidden,
                "chunk": chunk,
                "reference": reference,
            }
            for method, k in [("dense", 1), *(("vocab", k) for k in shards)]:
                results.append(run_child({**base, "method": method, "shards": k}))
                print(f"done: V={vocab} {method} K={k}", file=sys.stderr, flush=True)
    for r in results:
        v, n, c, k = r["vocab"], r["tokens"], r["chunk"], r["shards"]
        flight = n * v if r["method"] == "dense" else min(c or n, n) * math.ceil(v / k)
        r["in_flight_mib"] = flight * 4 / MIB
        r["floor_mib"] = (v + n) * r["hidden"] * 4 / MIB  # d(weight) + d(hidden)
    return results


def table(results: list[dict]) -> str:
    r0 = results[0]
    lines = [
        f"{r0['tokens']} tokens, hidden {r0['hidden']}, float32, chunk {r0['chunk']} tokens, 1 thread of a "
        "shared 2-core CPU. peak = peak RSS (ru_maxrss) of a fresh process minus its RSS after the inputs "
        "were allocated; floor = d(weight) + d(hidden); in flight = one float32 logits buffer (analytic).",
        "| vocab | method | in flight MiB | floor MiB | peak MiB | vs dense | (peak-floor) vs K=1 | ms | "
        "err fwd | err grad |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["vocab"]: r["peak_mib"] for r in results if r["method"] == "dense"}
    k1 = {
        r["vocab"]: r["peak_mib"] - r["floor_mib"]
        for r in results
        if r["method"] == "vocab" and r["shards"] == 1
    }
    for r in results:
        name = "dense" if r["method"] == "dense" else f"K={r['shards']}"
        over = (
            (r["peak_mib"] - r["floor_mib"]) / k1[r["vocab"]]
            if r["vocab"] in k1 and name != "dense"
            else None
        )
        errs = [f"{r[e]:.1e}" if e in r else "-" for e in ("err_fwd", "err_grad")]
        mib = " | ".join(f"{r[k]:,.0f}" for k in ("in_flight_mib", "floor_mib", "peak_mib"))
        lines.append(
            f"| {r['vocab']} | {name} | {mib} | {r['peak_mib'] / dense[r['vocab']]:.2f} "
            f"| {'-' if over is None else f'{over:.2f}'} | {r['ms']:,.0f} | {errs[0]} | {errs[1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="a small grid (under a minute)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per pass (default 1024)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk (default 512)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        results = measure(vocabs=(32768, 65536), tokens=1024, hidden=256, shards=(1, 4), chunk=256)
    else:
        results = measure(tokens=args.tokens, hidden=args.hidden, chunk=args.chunk)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
