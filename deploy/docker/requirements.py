"""Print the requirements pyproject.toml names for asyncflow and the given extras, one a line.

The Dockerfile installs them from pyproject.toml alone, before any source is copied, so that a
code change does not reinstall the dependencies. Usage: python requirements.py PYPROJECT EXTRAS
(EXTRAS comma-separated, may be empty). Self-references (`asyncflow[...]`) are followed.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    name, optional = project["name"], project.get("optional-dependencies", {})
    out, todo, seen = list(project["dependencies"]), [e for e in extras if e], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            sys.exit(f"{pyproject} has no extra {extra!r}; it has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            own = re.match(rf"^{re.escape(name)}\[([^\]]+)\]", req)
            if own:
                todo.extend(e.strip() for e in own.group(1).split(","))
            else:
                out.append(req)
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2].split(","))))
