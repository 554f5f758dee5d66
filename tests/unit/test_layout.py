"""The code stays readable at a glance: no module over 500 lines, no function over 60 (docstring
aside) outside the recipes, whose loops are meant to be read top to bottom."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("asyncflow", "dataplane", "workers", "services")


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, "split these by concept"


def test_no_function_is_over_60_lines():
    long = {}
    for path in modules():
        if "recipes" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    n -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
                if n > 60:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}, "shorten these"
