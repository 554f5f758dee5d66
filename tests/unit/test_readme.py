"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_readme_python_blocks_run(redis_url):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README shows no Python example"
    for block in blocks:
        code = block.replace("ray.init()", "ray.init(num_cpus=4, include_dashboard=False)")
        code = code.replace("redis://127.0.0.1:6379/0", redis_url)  # the session's own server
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0, out.stderr[-3000:]
