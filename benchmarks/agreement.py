"""Log-prob agreement: the trainer against the torch engine and vLLM, in float32 and bfloat16.

For each architecture (tiny randomly initialised Llama, Qwen2 and GPT-2 checkpoints with a byte-level
BPE tokenizer and a ChatML template, built here) and each dtype, one fresh child process loads the
checkpoint as the trainer does (model.dtype), hands its weights to the torch engine, starts vLLM on
the same directory (rollout.vllm.dtype), samples from both engines on chat-templated prompts at
temperature 1, and scores every sampled token with the trainer's log-probs (TokenKind.logprobs,
whole logits and chunked through the head). Pairs compared, over the same tokens:

  trainer-torch    the trainer's log-probs against the torch engine's, on its samples
  trainer-vllm     the trainer's log-probs against vLLM's, on its samples
  torch-fp32       the torch engine's against the float32 trainer (the precision loss alone)
  vllm-fp32        vLLM's against the float32 trainer
  chunked-whole    the trainer's chunked log-probs against its whole-logits ones

`--logit-scale` multiplies the final norm's weight (and so the logits) of the random checkpoint:
at 1 its logits are nearly flat (std ~0.3 over the vocabulary), a trained model's spread far more,
and the bfloat16 error grows with them. (Scaling the head itself would scale a tied embedding too.)

    .venv/bin/python benchmarks/agreement.py --json docs/bench-agreement.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS, DTYPES = ("llama", "qwen2", "gpt2"), ("float32", "bfloat16")
PAIRS = ("trainer-torch", "trainer-vllm", "torch-fp32", "vllm-fp32", "chunked-whole")
CORPUS = [f"What is {a} plus {b}? {a} + {b} = {a + b}. #### {a + b}" for a in range(40) for b in range(40)]
PROMPTS, SAMPLES, MAX_NEW_TOKENS, CHUNK_TOKENS = 8, 4, 32, 16


def checkpoint(arch: str, root: Path, hidden_size: int, logit_scale: float) -> str:
    """A tiny checkpoint of `arch` saved under `root`, its logits scaled by `logit_scale`."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.models import build_bpe_tokenizer, build_checkpoint, save_model

    tok = build_bpe_tokenizer(CORPUS, vocab_size=400)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    path = build_checkpoint(arch, tok, root / arch, hidden_size=hidden_size, num_layers=4,
                            num_heads=hidden_size // 64, eos_token_ids=[im_end])  # fmt: skip
    if logit_scale != 1.0:
        model = AutoModelForCausalLM.from_pretrained(path)
        body = model.base_model
        norm = body.norm if hasattr(body, "norm") else body.ln_f  # Llama / Qwen2, GPT-2
        with torch.no_grad():  # the head is linear without bias: the logits scale as the norm's output
            for p in norm.parameters():
                p.mul_(logit_scale)
        save_model(model, tok, path)
    return str(path)


def diff(a, b) -> dict:
    d = (a - b).abs()
    return {"max": d.max().item(), "mean": d.mean().item()}


async def sample(engine, kind, prompts) -> list:
    requests = [kind.request(str(i), p, SAMPLES, kind.params()) for i, p in enumerate(prompts)]
    return await engine.generate(requests)


def child(arch: str, dtype: str, hidden_size: int, logit_scale: float) -> dict:
    import torch

    from asyncflow.config import ModelConfig, RolloutConfig
    from asyncflow.tasks import Example
    from services.serving.vllm import VLLMEngine
    from workers.kinds import TokenKind
    from workers.policy import make_tokenizer

    path = checkpoint(arch, Path(tempfile.mkdtemp()), hidden_size, logit_scale)
    rollout = RolloutConfig(max_new_tokens=MAX_NEW_TOKENS)

    def kind_of(model_dtype: str, chunk_tokens: int = 0) -> TokenKind:
        config = ModelConfig(path=path, dtype=model_dtype)
        return TokenKind(make_tokenizer(None, config), config, rollout, chunk_tokens=chunk_tokens)

    kind, chunked, fp32 = kind_of(dtype), kind_of(dtype, CHUNK_TOKENS), kind_of("float32")
    model, model_fp32 = kind.model(0), fp32.model(0)
    examples = [
        Example([{"role": "user", "content": f"What is {a} plus {a % 7}?"}], "") for a in range(PROMPTS)
    ]
    prompts = kind.prompts(examples)["prompt_ids"]
    torch_engine = kind.engine(seed=0)
    asyncio.run(torch_engine.update_weights(0, model.state_dict()))
    outputs = {"torch": asyncio.run(sample(torch_engine, kind, prompts))}
    vllm = VLLMEngine(path, eos_token_id=kind.stop_ids[0], kv_cache_gib=0.125, dtype=dtype)
    try:
        outputs["vllm"] = asyncio.run(sample(vllm, kind, prompts))
    finally:
        asyncio.run(vllm.close())
    figures: dict = {"arch": arch, "dtype": dtype, "logit_scale": logit_scale}
    for name, out in outputs.items():
        data = {
            "prompt_ids": [prompts[int(c.request_id)] for c in out],
            **kind.results(out),
            "reward": [0.0] * len(out),
        }
        rows = kind.rows(data, list(range(len(out))), reference=False)
        with torch.no_grad():
            lp, mask = kind.logprobs(model, rows)
            lp_chunked, lp_fp32 = chunked.logprobs(model, rows)[0], fp32.logprobs(model_fp32, rows)[0]
            logits = model_fp32(input_ids=torch.tensor([prompts[0]])).logits  # (1, L, V)
        engine = torch.tensor([v for r in rows for v in r.behavior])
        figures[f"trainer-{name}"] = diff(lp[mask], engine)
        figures[f"{name}-fp32"] = diff(engine, lp_fp32[mask])
        figures.setdefault("chunked-whole", diff(lp_chunked[mask], lp[mask]))
        figures[f"{name}_tokens"] = int(mask.sum())
    figures["logit_std"] = logits.float().std(-1).mean().item()
    return figures


def run_child(arch: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{arch},{dtype}", "--hidden-size", str(args.hidden_size),
           "--logit-scale", str(args.logit_scale)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        return {"arch": arch, "dtype": dtype, "logit_scale": args.logit_scale, "error": error}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = "| arch | dtype | logit std | " + " | ".join(f"{p} max / mean" for p in PAIRS) + " |"
    lines = [head, "|" + "---|" * (3 + len(PAIRS))]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['dtype']} | failed: {r['error']} |")
            continue
        cells = [f"{r[p]['max']:.2e} / {r[p]['mean']:.2e}" for p in PAIRS]
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['logit_std']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--hidden-size", type=int, default=256, help="checkpoints' width (64 per head)")
    parser.add_argument("--logit-scale", type=float, default=1.0, help="multiplies the logits")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        arch, dtype = args.child.split(",")
        print(json.dumps(child(arch, dtype, args.hidden_size, args.logit_scale)))
        return 0
    results = []
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            results.append(run_child(arch, dtype, args))
            print(f"done: {arch} {dtype}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
