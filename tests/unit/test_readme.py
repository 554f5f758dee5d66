"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

# Prepended to each block: if it is still running shortly before the timeout, it prints where
# every thread and every asyncio task of the process waits, so a hang says where it hangs.
WHERE_AFTER = """\
def _where(after_s):
    import asyncio, faulthandler, gc, sys, time
    time.sleep(after_s)
    print("--- still running: every asyncio task, then every thread ---", file=sys.stderr)
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        for task in asyncio.all_tasks(loop):  # each task's chain of awaits, outermost first
            print(task.get_name(), file=sys.stderr)
            step = task.get_coro()
            while hasattr(step, "cr_frame") and step.cr_frame is not None:
                print(f"  {step.cr_frame.f_code.co_filename}:{step.cr_frame.f_lineno}", file=sys.stderr)
                step = step.cr_await
            print(f"  waits on {step!r:.300}", file=sys.stderr)
    faulthandler.dump_traceback(all_threads=True)
__import__("threading").Thread(target=_where, args=(AFTER_S,), daemon=True).start()
"""


@pytest.mark.integration
def test_readme_python_blocks_run(redis_url):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README shows no Python example"
    for block in blocks:
        code = block.replace("ray.init()", "ray.init(num_cpus=4, include_dashboard=False)")
        code = code.replace("redis://127.0.0.1:6379/0", redis_url)  # the session's own server
        code = WHERE_AFTER.replace("AFTER_S", str(TIMEOUT_S - 20)) + code
        try:
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
            pytest.fail(
                f"a README block ran past {TIMEOUT_S} s:\n{block}\nits stderr, last part:\n{stderr[-12000:]}"
            )
        assert out.returncode == 0, out.stderr[-3000:]
