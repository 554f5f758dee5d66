"""Tools: an environment whose every turn may call one tool.

A tool call is written in the model's turn as `<name>arguments</name>` (the pattern is the
environment's `call` option). The call is parsed from the turn, the tool runs, and its
result, formatted by `result`, is the next observation. A tool that fails (`ToolFailed`: bad
arguments, a killed sandbox) answers with `error` instead, and the episode records why in
its info (`tool_errors`). A turn without a call is the final answer: the episode ends, and
the environment's `score` (if any) gives the reward parts from that answer.

Tools know nothing about episodes: `await tool.run(arguments) -> text`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from asyncflow.envs import Example, Step

__all__ = ["Calculator", "Tool", "ToolEnv", "ToolFailed", "parse_call"]

CALL = r"<(?P<name>[A-Za-z_][A-Za-z0-9_]*)>(?P<arguments>.*?)</(?P=name)>"


class ToolFailed(Exception):
    """A tool call that produced no result; the message says why (it is recorded, and shown)."""


@runtime_checkable
class Tool(Protocol):
    name: str  # what a call names: <name>...</name>

    async def run(self, arguments: str) -> str:
        """The call's result as text; raises ToolFailed when there is none."""
        ...


def parse_call(text: str, pattern: str = CALL) -> tuple[str, str] | None:
    """(tool name, arguments) of the first call in `text`, or None when it calls nothing. The
    pattern needs the groups `name` and `arguments`."""
    match = re.search(pattern, text, flags=re.S)
    return None if match is None else (match.group("name"), match.group("arguments"))


class ToolEnv:
    """An environment of tools: each turn may call one; a turn without a call ends the episode."""

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        score: Callable[[str, Example], dict[str, float]] | None = None,
        call: str = CALL,
        result: str = "{result}",
        error: str = "error: {reason}",
        first: str = "",
    ):
        names = [t.name for t in tools]
        if not tools or len(set(names)) != len(names):
            raise ValueError(f"ToolEnv needs tools with distinct names, got {names}; name each tool once")
        for group in ("name", "arguments"):
            if f"(?P<{group}>" not in call:
                raise ValueError(f"ToolEnv call pattern {call!r} has no group {group!r}; see tools.CALL")
        self.tools = {t.name: t for t in tools}
        self.score, self.call, self.result, self.error, self.first = score, call, result, error, first
        self.example: Example | None = None

    async def reset(self, example: Example) -> str:
        self.example = example
        return self.first

    async def step(self, response: str) -> Step:
        parsed = parse_call(response, self.call)
        if parsed is None:  # the final answer
            assert self.example is not None, "ToolEnv.step before reset"
            parts = self.score(response, self.example) if self.score else {}
            return Step(done=True, reward=parts, info={"answer": response})
        name, arguments = parsed
        tool = self.tools.get(name)
        try:
            if tool is None:
                raise ToolFailed(f"no tool {name!r}; the tools are {sorted(self.tools)}")
            text = await tool.run(arguments)
        except ToolFailed as e:
            return Step(self.error.format(reason=e), info={"tool": name, "tool_error": str(e)})
        return Step(self.result.format(result=text), info={"tool": name})

    async def close(self) -> None:
        for tool in self.tools.values():
            closing = getattr(tool, "close", None)
            if closing is not None:
                await closing()


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY: dict[type, Any] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class Calculator:
    """Arithmetic on numbers: + - * / // % ** and parentheses (no names, no calls: nothing runs
    but arithmetic). Integral results print without a decimal point."""

    name = "calc"

    def __init__(self, max_digits: int = 64, name: str = "calc"):
        self.max_digits, self.name = max_digits, name

    async def run(self, arguments: str) -> str:
        return self.evaluate(arguments)

    def evaluate(self, expression: str) -> str:
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError:
            raise ToolFailed(f"{expression!r} is not an arithmetic expression") from None
        try:
            value = self._value(tree.body)
        except (ZeroDivisionError, OverflowError) as e:
            raise ToolFailed(f"{expression!r}: {e}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def _value(self, node: ast.AST) -> int | float:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._value(node.operand))  # type: ignore[operator]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._value(node.left), self._value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) * len(str(abs(int(left)))) > self.max_digits:
                raise ToolFailed(f"{left} ** {right} has more than {self.max_digits} digits")
            value: int | float = _BINARY[type(node.op)](left, right)  # type: ignore[operator]
            if isinstance(value, int) and len(str(abs(value))) > self.max_digits:
                raise ToolFailed(f"the result has more than {self.max_digits} digits")
            return value
        raise ToolFailed(f"{ast.unparse(node)!r} is not arithmetic on numbers")
