"""RewardProcesses: a pool of reward processes whose calls can be killed.

A reward function that hangs in a thread cannot be stopped from Python; in a process it can.
Each process (workers/reward_child.py) loads the reward function once by its 'module:function'
spec and answers calls over a socket pair: msgpack bytes both ways (Connection.send_bytes /
recv_bytes), no pickle. A call past its deadline kills its process (SIGKILL) and a fresh one
starts in the background; a call that allocates past `memory_limit_mb` fails with MemoryError
and its process is replaced; a process that dies mid-call fails that call only. Every failure
reaches the caller as TimeoutError or RewardFailed, for one sample (or one group); a reward
that cannot be loaded at all is a WorkerError, which stops the run with its cause.

The processes are started with subprocess (fork + exec of a fresh interpreter), not
multiprocessing: a Ray worker is threaded, so it must not fork without exec, and
multiprocessing's spawn would re-import the Ray worker's __main__ in every process.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from asyncflow.errors import WorkerError
from dataplane.codec import pack, unpack
from dataplane.errors import CodecError

ENTRY = "from workers.reward_child import main; main({fd})"


class RewardFailed(Exception):
    """One reward call failed; the message says why (the function's error, or its process's end)."""


@dataclass(eq=False)
class _Process:
    proc: subprocess.Popen
    conn: Connection


async def readable(conn: Connection, timeout_s: float) -> bool:
    """Whether `conn` has something to read (a message, or its end) within `timeout_s`."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(True)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


class RewardProcesses:
    """`processes` reward processes serving `spec` (made with `options` when given); each may grow
    by `memory_limit_mb` past what it holds once loaded (0: no limit)."""

    def __init__(
        self, spec: str, options: dict | None = None, *, processes: int = 2, memory_limit_mb: int = 0,
        load_timeout_s: float = 120.0,
    ):  # fmt: skip
        self.setup = {"spec": spec, "options": options or {}, "sys_path": list(sys.path),
                      "memory_limit_mb": memory_limit_mb}  # fmt: skip
        self.size, self.load_timeout_s = processes, load_timeout_s
        self.restarts = 0  # processes replaced: killed past a deadline, out of memory, or dead
        self._idle: asyncio.Queue[_Process | None] | None = None
        self._starting: asyncio.Future | None = None
        self._live: set[_Process] = set()
        self._tasks: set[asyncio.Task] = set()
        self._broken: Exception | None = None

    async def start(self) -> None:
        """Start every process and wait until each has loaded the function (once; a failure to load
        is raised to every caller)."""
        if self._starting is None:
            self._idle = asyncio.Queue()
            self._starting = asyncio.ensure_future(self._start_all())
        await asyncio.shield(self._starting)

    async def _start_all(self) -> None:
        assert self._idle is not None
        for process in await asyncio.gather(*(self._spawn() for _ in range(self.size))):
            self._idle.put_nowait(process)

    async def call(self, args: list, info: Any, timeout_s: float) -> Any:
        """The function's value on `args` (and the record's `info`, if it takes it). Raises
        TimeoutError past `timeout_s` (its process killed), RewardFailed if the call failed."""
        await self.start()
        assert self._idle is not None
        process = await self._idle.get()
        if process is None:  # no process could be started again: the run cannot score
            self._idle.put_nowait(None)
            raise WorkerError(str(self._broken))
        try:
            message = pack({"args": args, "info": info})
        except CodecError as e:  # a value the wire cannot carry
            self._idle.put_nowait(process)
            raise RewardFailed(f"the reward's arguments cannot be sent to its process: {e}") from None
        healthy = False
        try:
            process.conn.send_bytes(message)
            if not await readable(process.conn, timeout_s):
                raise TimeoutError(f"timed out after {timeout_s:g} s")
            reply = unpack(process.conn.recv_bytes())
            healthy = not str(reply.get("error", "")).startswith("MemoryError")  # it exits after one
        except TimeoutError:  # (an OSError too): its process is killed below
            raise
        except (EOFError, OSError):
            raise RewardFailed(f"the reward process died ({self._end(process)})") from None
        finally:
            if healthy:
                self._idle.put_nowait(process)
            else:  # killed past its deadline, cancelled mid-call, dead or out of memory: a fresh one
                self._replace(process)
        if "error" in reply:
            raise RewardFailed(reply["error"])
        return reply["value"]

    async def _spawn(self) -> _Process:
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY.format(fd=theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        process = _Process(proc, Connection(ours.detach()))
        self._live.add(process)
        spec = self.setup["spec"]
        try:
            process.conn.send_bytes(pack(self.setup))
            if not await readable(process.conn, self.load_timeout_s):
                raise WorkerError(f"a reward process did not load {spec!r} within {self.load_timeout_s:g} s")
            reply = unpack(process.conn.recv_bytes())
        except (EOFError, OSError):
            self._kill(process)
            raise WorkerError(f"a reward process loading {spec!r} died ({self._end(process)})") from None
        except BaseException:
            self._kill(process)
            raise
        if "error" in reply:
            self._kill(process)
            raise WorkerError(f"a reward process could not load {spec!r}: {reply['error']}")
        return process

    def _replace(self, process: _Process) -> None:
        self.restarts += 1
        self._kill(process)
        task = asyncio.ensure_future(self._respawn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self) -> None:
        assert self._idle is not None
        try:
            self._idle.put_nowait(await self._spawn())
        except Exception as e:  # it loaded before: a failure now is the machine's (memory, processes)
            self._broken = e
            self._idle.put_nowait(None)

    def _end(self, process: _Process) -> str:
        """How a process ended, for messages: its exit code, or the signal that killed it."""
        code = process.proc.poll()
        if code is None:
            try:
                code = process.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                return "it stopped answering"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _kill(self, process: _Process) -> None:
        self._live.discard(process)
        process.conn.close()
        if process.proc.poll() is None:
            process.proc.kill()
        try:
            process.proc.wait(timeout=5.0)  # reaped: SIGKILL ends it at once
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Kill every process (a call in flight fails)."""
        for task in list(self._tasks):
            task.cancel()
        for process in list(self._live):
            self._kill(process)
