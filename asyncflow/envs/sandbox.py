"""PythonTool: runs the code of a tool call in a sandboxed subprocess.

Each call starts a fresh interpreter (`python -I`: no user site, no PYTHON* variables) with an
empty environment, a new temporary directory as its working directory (removed after the
call) and, set in the child before the code runs, limits from `resource.setrlimit`: address
space (`memory_mb`), CPU seconds and file size. An audit hook (`sys.addaudithook`, PEP 578)
refuses every socket operation (no network), starting processes (os.system, subprocess, exec,
fork: nothing escapes the hook) and loading ctypes. Past `timeout_s` of wall time the process
is killed. The result is what the code printed; a call that fails says why, one of:
"timeout", "memory", "refused" (network or processes), "error" (the code raised).

This is containment for a model's mistakes (a loop that never ends, an allocation that
never fits, a stray connection), not a security boundary against hostile code: run untrusted
code in a container or VM as well.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile

from asyncflow.envs.tools import ToolFailed

__all__ = ["BOOT", "PythonTool"]

# The child's first lines: limits, then the audit hook, then the code read from stdin.
BOOT = r"""
import json, resource, sys, traceback
limits = json.loads(sys.argv[1])
code = sys.stdin.read()
mem = limits["memory_mb"] << 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] << 20, limits["file_mb"] << 20))
REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "pty.spawn", "ctypes.")
def hook(event, args):
    if event.startswith(REFUSED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"refused in the sandbox: {event}")
sys.addaudithook(hook)
try:
    exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
except MemoryError:
    sys.stdout.flush()
    sys.stderr.write("\nASYNCFLOW-SANDBOX memory: MemoryError\n")
    sys.exit(1)
except PermissionError as e:
    if "refused in the sandbox" not in str(e):
        raise
    sys.stderr.write(f"\nASYNCFLOW-SANDBOX refused: {e}\n")
    sys.exit(1)
"""
MARK = "ASYNCFLOW-SANDBOX "


class PythonTool:
    """Python code in, what it printed out; see the module's docstring for the sandbox."""

    def __init__(
        self, *, timeout_s: float = 5.0, memory_mb: int = 256, cpu_s: int = 5, file_mb: int = 16,
        max_output_chars: int = 2000, name: str = "python",
    ):  # fmt: skip
        if timeout_s <= 0 or memory_mb < 32 or cpu_s < 1 or file_mb < 0 or max_output_chars < 1:
            raise ValueError(
                f"PythonTool(timeout_s={timeout_s}, memory_mb={memory_mb}, cpu_s={cpu_s}, file_mb={file_mb}, "
                f"max_output_chars={max_output_chars}): expected timeout_s > 0, memory_mb >= 32 (the "
                "interpreter's own), cpu_s >= 1, file_mb >= 0, max_output_chars >= 1"
            )
        self.name, self.timeout_s, self.max_output_chars = name, timeout_s, max_output_chars
        self.limits = {"memory_mb": memory_mb, "cpu_s": cpu_s, "file_mb": file_mb}

    async def run(self, arguments: str) -> str:
        workdir = tempfile.mkdtemp(prefix="asyncflow-tool-")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", BOOT, json.dumps(self.limits), cwd=workdir, env={},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(proc.communicate(arguments.encode()), self.timeout_s)
            except TimeoutError:
                raise ToolFailed(f"timeout: killed after {self.timeout_s:g} s") from None
            finally:
                if proc.returncode is None:  # past the deadline, or the call was cancelled
                    proc.kill()
                    await proc.wait()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if proc.returncode != 0:
            raise ToolFailed(self._why(proc.returncode, err.decode(errors="replace")))
        return out.decode(errors="replace")[: self.max_output_chars]

    def _why(self, code: int | None, stderr: str) -> str:
        """Why a call failed, from its exit and the last lines it wrote."""
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGXCPU:
                return f"timeout: {name} after {self.limits['cpu_s']} s of CPU"
            return (
                f"memory: killed by {name}" if -code in (signal.SIGKILL, signal.SIGSEGV) else f"error: {name}"
            )
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith(MARK):
                return line[len(MARK) :]
            if "refused in the sandbox" in line:  # the refusal, wrapped by a library (urllib's URLError)
                return f"refused: {line}"[: self.max_output_chars]
        return f"error: {lines[-1] if lines else f'exit code {code}'}"[: self.max_output_chars]
