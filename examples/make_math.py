"""Make the inputs of examples/math.yaml here, in a minute or two on 2 cores; nothing is downloaded.

    .venv/bin/python examples/make_math.py            # writes runs/math-inputs/
    .venv/bin/asyncflow run examples/math.yaml

It writes what a user brings from elsewhere: a checkpoint (a small Qwen2-shaped model with a
byte-level BPE tokenizer and a ChatML chat template, `save_pretrained`), briefly pre-trained on
GSM8K-style word problems in chat format whose answers end in `#### <number>`, and JSON-lines
train and eval files of new problems (`messages` and `answer` columns). The pre-training stops
early on purpose: the model gets the format and some of the sums, and RL (examples/math.yaml,
reward `final_number`) has the rest to learn.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.algorithms import pack  # noqa: E402
from services.models import build_bpe_tokenizer, build_checkpoint  # noqa: E402

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana"]
THINGS = ["apples", "books", "coins", "pens", "shells", "stamps"]
CHAT_TEMPLATE_TEXT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
TOP = 9  # numbers in a problem: 1..TOP (single digits: a tiny model learns the sums in minutes)


def problem(rng: random.Random, top: int = TOP) -> tuple[str, str, int]:
    """(question, worked answer ending in `#### n`, n), with numbers from 1 to `top`."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, top), rng.randint(1, top)
    if rng.random() < 0.5:
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return q, f"{a} + {b} = {a + b}. #### {a + b}", a + b
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
    return q, f"{a} - {b} = {a - b}. #### {a - b}", a - b


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/math-inputs", help="folder to write (default: runs/math-inputs)")
    ap.add_argument("--steps", type=int, default=400, help="pre-training steps (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    corpus = [problem(rng) for _ in range(4000)]
    texts = [CHAT_TEMPLATE_TEXT.format(q=q, a=a) for q, a, _ in corpus]  # the tokenizer sees chats
    tok = build_bpe_tokenizer(texts, vocab_size=512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    path = build_checkpoint("qwen2", tok, out / "model", hidden_size=128, num_layers=2, num_heads=4,
                            max_positions=160, seed=args.seed, eos_token_ids=[im_end])  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The tokenizer as a run loads it: transformers gives a Qwen2 checkpoint Qwen2's pre-tokenizer
    # (one token per digit), whatever the saved one said; pre-train on exactly those ids.
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = [problem(rng) for _ in range(32)]
        prompts = [
            tok.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) for q, _, _ in batch
        ]
        prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        answers = [tok.encode(a, add_special_tokens=False) + [im_end] for _, a, _ in batch]
        ids, targets, mask = pack(prompt_ids, answers, pad=tok.pad_token_id)
        logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"pre-training step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.save_pretrained(path)
    for name, count, seed in (("train", 2000, 1), ("eval", 256, 2)):
        rows = [problem(random.Random(seed * 100_000 + i)) for i in range(count)]
        lines = [json.dumps({"messages": chat(q), "answer": str(n)}) for q, _, n in rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}, {out / 'train.jsonl'}, {out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
