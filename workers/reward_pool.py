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
        (result,) = await self.call_many([(args, info)], timeout_s)
        if isinstance(result, Exception):
            raise result
        return result

    async def call_many(self, calls: list[tuple[list, Any]], timeout_s: float) -> list[Any]:
        """Each call's value, or the TimeoutError / RewardFailed it failed with, in order. The calls
        go to one process as one message and come back one reply each, and each has `timeout_s` from
        the reply before it. A call that hangs, runs out of memory or kills its process fails alone:
        the process is replaced and the calls after it go on in another."""
        results: list[Any] = []
        while len(results) < len(calls):
            pending = calls[len(results) :]
            try:
                message = pack({"calls": [{"args": args, "info": info} for args, info in pending]})
            except CodecError as e:  # a value the wire cannot carry: find it, one call at a time
                if len(pending) > 1:
                    for one in pending:
                        results += await self.call_many([one], timeout_s)
                    break
                results.append(RewardFailed(f"the reward's arguments cannot be sent to its process: {e}"))
                continue
            process = await self._take()
            healthy = False
            try:
                healthy = await self._replies(process, message, len(pending), timeout_s, results)
            finally:
                if healthy:
                    self._idle.put_nowait(process)  # type: ignore[union-attr]
                else:  # killed past its deadline, cancelled mid-call, dead or out of memory: a fresh one
                    self._replace(process)
        return results

    async def _take(self) -> _Process:
        """An idle process (waiting for one); WorkerError once none can be started again."""
        await self.start()
        assert self._idle is not None
        process = await self._idle.get()
        if process is None:  # no process could be started again: the run cannot score
            self._idle.put_nowait(None)
            raise WorkerError(str(self._broken))
        return process

    async def _replies(self, process: _Process, message: bytes, n: int, timeout_s: float, out: list) -> bool:
        """Send `message` (n calls) and append each call's result to `out` as its reply arrives;
        whether the process is still fit to serve (False: it hung, died or ran out of memory,
        after which the calls not answered are not in `out`)."""
        try:
            process.conn.send_bytes(message)
            for _ in range(n):
                # the event loop only when no reply is waiting: a fast function's replies are read in a run
                if not process.conn.poll(0) and not await readable(process.conn, timeout_s):
                    out.append(TimeoutError(f"timed out after {timeout_s:g} s"))
                    return False
                reply = unpack(process.conn.recv_bytes())
                if "error" not in reply:
                    out.append(reply["value"])
                    continue
                out.append(RewardFailed(reply["error"]))
                if str(reply["error"]).startswith("MemoryError"):  # it exits after one
                    return False
        except (EOFError, OSError):
            out.append(RewardFailed(f"the reward process died ({self._end(process)})"))
            return False
        return True

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
