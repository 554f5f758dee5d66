"""Rewards for text answers, ready to name in `task.reward` (`asyncflow.tasks.rewards:NAME`).

Each is `reward(prompt, response, answer)` on decoded text: 1.0 for a correct response and 0.0
otherwise (`answer_format` checks the shape only), or, for `graded`, a dict of named parts whose
sum is the reward (every part is logged as `reward/<name>`). A task's own reward function plugs in
the same way; DAPO's overlong penalty is a config option (`reward.overlong_buffer`), not a function.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def exact(prompt: str, response: str, answer: str) -> float:
    """The response is the answer (surrounding whitespace aside)."""
    return float(response.strip() == answer.strip())


def final_number(prompt: str, response: str, answer: str) -> float:
    """The number after the response's last `####` (GSM8K's format), or else its last number,
    equals the answer's number (commas and trailing zeros aside)."""
    found = _FINAL.findall(response) or _NUMBER.findall(response)
    want = _FINAL.findall(answer) or _NUMBER.findall(answer)
    return float(bool(found and want) and _number(found[-1]) == _number(want[-1]))


def boxed(prompt: str, response: str, answer: str) -> float:
    """The response's last `\\boxed{...}` holds the answer (as text, spaces aside)."""
    found = _BOXED.findall(response)
    return float(bool(found) and found[-1].replace(" ", "") == answer.strip().replace(" ", ""))


def math_verify(prompt: str, response: str, answer: str) -> float:
    """The response's final answer is mathematically equal to the answer (HF's math-verify:
    `\\boxed{}` and `####` extraction, LaTeX and plain forms, 1/2 = 0.5 = \\frac{1}{2})."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError(
            "asyncflow.tasks.rewards:math_verify needs the math-verify package: pip install "
            "'math-verify>=0.9' (in an AsyncFlow checkout: pip install -e '.[math]')"
        ) from None
    final, want = _FINAL.findall(response), _FINAL.findall(answer)  # GSM8K's answers end in `#### n`
    answer = want[-1] if want else answer
    target = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    got = parse(f"${final[-1]}$") if final else parse(response)
    return float(bool(got) and bool(target) and verify(target, got))


def answer_format(prompt: str, response: str, answer: str) -> float:
    """The response ends with a final answer in GSM8K's form, `#### <number>`."""
    return float(bool(re.search(r"####\s*-?[\d,]*\.?\d+\s*$", response)))


class Regex:
    """The response's last match of `pattern` (its first group, if it has one) equals the answer,
    spaces around it aside: extraction by a pattern of your own, made from task.reward_options.

        task: {reward: "asyncflow.tasks.rewards:Regex", reward_options: {pattern: "Answer: (\\S+)"}}
    """

    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"task.reward_options.pattern {pattern!r} is not a regular expression: {e}"
            ) from None

    def __call__(self, prompt: str, response: str, answer: str) -> float:
        found = [m.group(1) if m.groups() else m.group(0) for m in self.pattern.finditer(response)]
        return float(bool(found) and found[-1].strip() == answer.strip())


def graded(prompt: str, response: str, answer: str) -> dict[str, float]:
    """`final_number` as the part `correct`, plus a tenth of `answer_format` as the part `format`:
    a small pull towards the `#### <number>` form while the answers are still wrong."""
    return {
        "correct": final_number(prompt, response, answer),
        "format": 0.1 * answer_format(prompt, response, answer),
    }


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None
