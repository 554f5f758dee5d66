"""Receive buffers for large messages, their pages faulted in while the process is idle.

Used by `dataplane.memory.wire`; it knows nothing about sockets or messages.
"""

from __future__ import annotations

import asyncio

import numpy as np


class BufferPool:
    """Receive buffers whose pages are already faulted in, made while the process is idle.

    A store keeps what it receives, so every large message lands in fresh memory, and the
    kernel faulting its pages in (~0.6 µs a page here) was most of the cost of a 512 KB
    write. After a large message arrives, a buffer for the next one of about that size is
    allocated and touched from the event loop's idle time (`call_soon`), off the path of
    the request. Smaller or rarer sizes just get `np.empty`.
    """

    _MIN = 1 << 18  # below this, faults are cheap enough to take inline
    _MAX = 64 << 20  # above this, no spares are kept: memory is committed only as bytes arrive
    _PAGE = 4096

    def __init__(self, spares: int = 2):
        self._spares = spares
        self._ready: list[np.ndarray] = []
        self._size = 0  # size class of the buffers kept ready
        self._refilling = False

    def take(self, n: int) -> np.ndarray:
        if n < self._MIN or n > self._MAX:
            return np.empty(n, np.uint8)  # np.empty: no zero-fill pass the socket would overwrite
        size = -(-n // (64 << 10)) * (64 << 10)  # round up to 64 KiB so near sizes share a class
        if size != self._size:
            self._ready.clear()
            self._size = size
        try:
            return self._ready.pop()[:n]
        except IndexError:  # none ready (or another thread's loop took the last one)
            return np.empty(n, np.uint8)

    def after_delivery(self) -> None:
        """Called once a large message was handed on: its handler runs first, then the refill."""
        if not self._refilling and self._size:
            self._refilling = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        self._refilling = False
        if len(self._ready) < self._spares:
            buffer = np.empty(self._size, np.uint8)
            buffer[:: self._PAGE] = 0  # one write per page faults it in now, not on the request path
            self._ready.append(buffer)
            if len(self._ready) < self._spares:
                self._refilling = True
                asyncio.get_running_loop().call_soon(self._refill)
