"""The Python stacks of a process, read from outside it: what a stuck actor is doing.

A stuck actor cannot answer a call, so its stacks are read by pid: `py-spy dump` reads
the process' memory without stopping it (it works on a frozen process too). Where py-spy
is missing or not permitted (no ptrace), a host that called `dump_on_signal()` at start
writes its threads' stacks itself (faulthandler, in C: a blocked event loop still
answers) to a file named by its pid when it gets SIGUSR2; the file is unlinked as soon as it
is open, so nothing outlives the process, and the reader finds it through /proc/PID/fd.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIGNAL = signal.SIGUSR2
_dump_file = None  # kept open for the life of the process: faulthandler writes to its descriptor


def dump_file(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"asyncflow-stacks-{pid}.txt"


def dump_on_signal() -> None:
    """From now on SIGUSR2 makes this process write every thread's stack to dump_file(its pid).
    The file is unlinked as soon as it is open: it lives as long as the process (however that
    ends, nothing is left in the temp directory), and a reader finds it as /proc/PID/fd/N."""
    global _dump_file
    if _dump_file is None:
        path = dump_file(os.getpid())
        _dump_file = open(path, "w+")  # noqa: SIM115 (faulthandler keeps writing to it)
        path.unlink()
        faulthandler.register(SIGNAL, file=_dump_file, all_threads=True, chain=False)


def _open_dump(pid: int) -> Path | None:
    """Process `pid`'s unlinked dump file, as its /proc/PID/fd/N entry (None: it has none)."""
    wanted = f"{dump_file(pid)} (deleted)"
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            entry = Path(f"/proc/{pid}/fd/{fd}")
            with contextlib.suppress(OSError):
                if os.readlink(entry) == wanted:
                    return entry
    except OSError:  # no such process, no /proc (not Linux), or not ours to read
        return None
    return None


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (a virtual environment), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def stack(pid: int, timeout_s: float = 20.0) -> str:
    """Every thread's Python stack in process `pid`, as text; says why when it cannot be read."""
    exe = py_spy()
    why = "py-spy is not installed (pip install py-spy)"
    if exe is not None:
        try:
            command = [exe, "dump", "--nonblocking", "--pid", str(pid)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode == 0:
                return done.stdout
            why = f"py-spy dump failed: {(done.stderr or done.stdout).strip()[-500:]}"
        except subprocess.TimeoutExpired:
            why = f"py-spy dump did not finish within {timeout_s:g} s"
    return _faulthandler_stack(pid, why, timeout_s)


def _faulthandler_stack(pid: int, why: str, timeout_s: float) -> str:
    file = _open_dump(pid)
    if file is None:
        return f"no stack: {why}; and process {pid} has no faulthandler dump file {dump_file(pid)}"
    size = file.stat().st_size
    try:
        os.kill(pid, SIGNAL)
    except OSError as e:
        return f"no stack: {why}; and SIGUSR2 to process {pid} failed ({e.strerror})"
    deadline = time.monotonic() + min(timeout_s, 5.0)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if file.stat().st_size > size:
            time.sleep(0.1)  # let it finish writing every thread
            with open(file) as f:
                f.seek(size)
                return f"({why}; faulthandler's dump instead)\n" + f.read()
    return f"no stack: {why}; and process {pid} wrote no faulthandler dump (frozen or not Python?)"
