"""One reward process: it loads the reward function by its 'module:function' spec, then answers
calls over its pipe until the pipe closes. It knows nothing of the store, the run or Ray.

Every message is msgpack (dataplane.codec: numpy arrays as raw buffers), sent with
Connection.send_bytes, never pickle. The first message is the setup:
`{"spec", "options", "sys_path", "memory_limit_mb"}`; the process answers `{"ready": pid}` once the
function is loaded, or `{"error": text}` and exits. Then each message is a batch of calls,
`{"calls": [{"args": [...], "info": ...}, ...]}`, and each call gets its own reply in order, sent
as soon as it is done: `{"value": result}` or `{"error": text}`. One message per batch instead of
one per call is what makes a process cheap for a function that takes microseconds; a reply per
call keeps each call's deadline its own (the pool times the gap between replies). Its address
space is capped at what it holds once loaded plus `memory_limit_mb` (RLIMIT_AS): a call that
allocates past that fails with MemoryError, that sample alone. A hung call is not this
process's concern: the pool kills it.

Started as `python -c "from workers.reward_child import main; main(FD)"`, FD a socket of the pair.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import resource
import sys
from multiprocessing.connection import Connection
from typing import Any

from dataplane.codec import pack, unpack

# The exit code of a process whose call ran out of memory: the pool starts a fresh one.
OUT_OF_MEMORY_EXIT = 3
MEMORY_HINT = "the call needed more memory than reward.memory_limit_mb allows; raise it, or score with less"


def takes_info(reward_fn: Any) -> bool:
    """Whether `reward_fn` takes the record's metadata as an `info` keyword (or **kwargs)."""
    try:
        params = inspect.signature(reward_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "info" or p.kind is p.VAR_KEYWORD for p in params)


def with_info(reward_fn: Any, info: Any) -> Any:
    """`reward_fn` with its `info` keyword bound to the decoded metadata: a dict per sample, or a
    list of them for a group."""

    def decode(text: str) -> dict:
        return json.loads(text) if text else {}

    return functools.partial(
        reward_fn, info=[decode(i) for i in info] if isinstance(info, list) else decode(info)
    )


def virtual_memory_mb() -> float:
    """This process's address space (VmSize) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load(setup: dict) -> Any:
    """The reward function the setup names (made from its options when they are given)."""
    from asyncflow.config.rl import import_string

    sys.path[:0] = [p for p in setup.get("sys_path", []) if p not in sys.path]
    reward = import_string(setup["spec"])
    options = setup.get("options") or {}
    return reward(**options) if options else reward


def answer(reward_fn: Any, info_too: bool, call: dict) -> tuple[bytes, bool]:
    """One call's reply (the function's value, or why it failed), and whether it ran out of memory."""
    try:
        fn = with_info(reward_fn, call.get("info", "")) if info_too else reward_fn
        value = fn(*call["args"])
        return pack({"value": value}), False
    except MemoryError:
        return pack({"error": f"MemoryError: {MEMORY_HINT}"}), True
    except Exception as e:  # the user's function failed (or msgpack cannot carry its value)
        return pack({"error": f"{type(e).__name__}: {e}"[:500]}), False


def serve(conn: Connection, setup: dict) -> None:
    """Load the function, say ready, then answer calls until the pipe closes."""
    try:
        reward_fn = load(setup)
    except Exception as e:
        conn.send_bytes(pack({"error": f"{type(e).__name__}: {e}"[:2000]}))
        return
    limit_mb = setup.get("memory_limit_mb") or 0
    if limit_mb:  # headroom over what the loaded function holds
        cap = int((virtual_memory_mb() + limit_mb) * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    info_too = takes_info(reward_fn)
    conn.send_bytes(pack({"ready": os.getpid()}))
    while True:
        try:
            calls = unpack(conn.recv_bytes())["calls"]
        except EOFError:  # the pool closed the pipe: its worker is done
            return
        for call in calls:
            reply, out_of_memory = answer(reward_fn, info_too, call)
            conn.send_bytes(reply)
            if out_of_memory:  # start afresh: a failed allocation may have left the heap torn
                sys.exit(OUT_OF_MEMORY_EXIT)


def die_with_parent() -> None:
    """Ask Linux to kill this process when the worker that started it dies (prctl PR_SET_PDEATHSIG):
    a hung call must not outlive a killed worker."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def main(fd: int) -> None:
    die_with_parent()
    conn = Connection(fd)
    try:
        serve(conn, unpack(conn.recv_bytes()))
    except EOFError:
        pass
    finally:
        conn.close()
