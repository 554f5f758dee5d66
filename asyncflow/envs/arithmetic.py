"""Products with a calculator: "123*456=" -> "56088", where the policy must call the tool.

A tiny model cannot multiply multi-digit numbers itself, but it can learn to write the call
`<calc>123*456</calc>`, read the result the environment appends (`[56088]`) and copy it as its
final answer. The episode: prompt, model turn (the call, then EOS), observation, model turn
(the answer, then EOS). The reward part `correct` is 1 for the exact product as the final
answer (`asyncflow.envs:episode_reward` makes it the row's reward). `demonstration` gives the
warm-start one whole episode, so it teaches the call format; RL does the rest.
"""

from __future__ import annotations

import random

from asyncflow.envs import Example
from asyncflow.envs.tools import Calculator, ToolEnv

__all__ = ["Products", "calculator_env", "direct", "exact"]

_EVAL_STREAM = 1 << 40  # eval indices live far from training indices


class Products:
    """a*b for numbers of `min_digits`..`max_digits` digits each."""

    symbols = "0123456789*=[]<>/acl?"

    def __init__(self, min_digits: int = 3, max_digits: int = 3, seed: int = 0):
        if not 1 <= min_digits <= max_digits <= 12:
            raise ValueError(
                f"Products needs 1 <= min_digits <= max_digits <= 12, got {min_digits} and {max_digits}; "
                "fix task.options"
            )
        self.min_digits, self.max_digits, self.seed = min_digits, max_digits, seed

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def example(self, index: int) -> Example:
        rng = random.Random(f"{self.seed}:{index}")
        a, b = self._number(rng), self._number(rng)
        return Example(f"{a}*{b}=", str(a * b))

    def eval_example(self, index: int) -> Example:
        return self.example(_EVAL_STREAM + index)

    def demonstration(self, example: Example) -> list[tuple[str, bool]]:
        """One whole episode after the prompt as (text, by the model) segments; each model segment
        ends its turn (the warm-start appends the stop token to it)."""
        expression = str(example.prompt).rstrip("=")
        return [(f"<calc>{expression}</calc>", True), (f"[{example.answer}]", False), (example.answer, True)]


def exact(answer: str, example: Example) -> dict[str, float]:
    """The reward parts of a final answer: `correct` is 1 for exactly the expected answer."""
    return {"correct": float(answer.strip() == example.answer)}


def direct(prompt: str, response: str, answer: str) -> float:
    """The control without the tool (env.source unset): 1 for the exact product as the response."""
    return float(response.strip() == answer)


def calculator_env(max_digits: int = 64) -> ToolEnv:
    """One episode's environment: the calculator as `calc`, results as `[...]`, errors as `[?]`."""
    return ToolEnv([Calculator(max_digits)], score=exact, result="[{result}]", error="[?]")
