"""Trainer memory: the peak of one forward + backward of the token log-probs, with and without
chunked log-probs (trainer.logprob_chunk_tokens) and gradient checkpointing (trainer.gradient_checkpointing).

What it measures, and how: each setting runs in a fresh child process, which builds the model and
the batch, reads its resident set size (RSS), runs TokenKind.logprobs (the trainer's own code)
and a backward of a weighted sum of the response tokens' log-probs once, then reads its peak RSS
(getrusage ru_maxrss). `peak_mib` is peak minus the RSS before the pass: the memory the pass
itself needed. On CPU, glibc serves large tensors from mmap and returns them on free, so the peak
RSS follows the live tensors; RSS also counts the allocator's and threads' overhead, so small
differences (< ~20 MiB) are noise. `pass_s` is the time of that one pass (no repeat: a single
figure on a shared machine). The workload is logits-bound, as a real vocabulary makes it: a
32768-token vocabulary over a narrow model, 8 rows of 128 prompt + 384 response tokens.

    .venv/bin/python benchmarks/memory.py --json docs/bench-memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 4, "num_heads": 4}
VOCAB, ROWS, PROMPT, RESPONSE = 32768, 8, 128, 384
# (logprob_chunk_tokens, gradient_checkpointing, top_k)
SETTINGS = [(0, False, 0), (1024, False, 0), (256, False, 0), (0, True, 0), (256, True, 0),
            (0, False, 50), (256, False, 50)]  # fmt: skip


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(chunk_tokens: int, checkpointing: bool, top_k: int) -> dict:
    import torch

    from asyncflow.config import ModelConfig, RolloutConfig
    from services.models import build_model
    from workers.kinds import TokenKind, TokenSample
    from workers.policy import enable_gradient_checkpointing

    torch.set_num_threads(2)
    model = build_model(VOCAB, max_positions=PROMPT + RESPONSE, seed=0, **SHAPE).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    kind = TokenKind(None, ModelConfig(), RolloutConfig(top_k=top_k), chunk_tokens=chunk_tokens)
    g = torch.Generator().manual_seed(0)
    rows = [
        TokenSample(torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist(),
                    torch.randint(3, VOCAB, (RESPONSE,), generator=g).tolist(), [], [], 0.0, None)
        for _ in range(ROWS)
    ]  # fmt: skip
    weights = torch.randn(ROWS * RESPONSE, generator=g)
    before = rss_mib()
    start = time.perf_counter()
    lp, mask = kind.logprobs(model, rows)
    (lp[mask] * weights).sum().backward()
    pass_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    return {
        "logprob_chunk_tokens": chunk_tokens, "gradient_checkpointing": checkpointing, "top_k": top_k,
        "rss_before_mib": before, "peak_mib": peak - before, "pass_s": pass_s,
        "logprob_sum": lp[mask].sum().item(), "grad_norm": grad_norm,
    }  # fmt: skip


def run_child(setting: tuple[int, bool, int]) -> dict:
    chunk, checkpointing, top_k = setting
    cmd = [sys.executable, __file__, "--child", f"{chunk},{int(checkpointing)},{top_k}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory child {setting} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    logits_mib = ROWS * (PROMPT + RESPONSE - 1) * VOCAB * 4 / 2**20
    lines = [
        f"vocab {VOCAB}, {SHAPE}, {ROWS} rows x ({PROMPT} prompt + {RESPONSE} response) tokens; "
        f"the whole float32 logits are {logits_mib:.0f} MiB",
        "| chunk tokens | gradient checkpointing | top-k | peak MiB (pass) | vs whole | pass s | grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["top_k"]: r["peak_mib"] for r in results if not r["logprob_chunk_tokens"]
            and not r["gradient_checkpointing"]}  # fmt: skip
    for r in results:
        ratio = r["peak_mib"] / base[r["top_k"]] if r["top_k"] in base else float("nan")
        lines.append(
            f"| {r['logprob_chunk_tokens'] or 'off'} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['top_k'] or 'off'} | {r['peak_mib']:,.0f} | {ratio:.2f}x | {r['pass_s']:.2f} "
            f"| {r['grad_norm']:.6g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        chunk, checkpointing, top_k = (int(v) for v in args.child.split(","))
        print(json.dumps(child(chunk, bool(checkpointing), top_k)))
        return 0
    results = []
    for setting in SETTINGS:
        results.append(run_child(setting))
        print(f"done: {setting}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        workload = {"shape": SHAPE, "vocab": VOCAB, "rows": ROWS, "prompt": PROMPT, "response": RESPONSE}
        args.json.write_text(json.dumps({"workload": workload, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
