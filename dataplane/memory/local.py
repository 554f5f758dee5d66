"""A memory store served by this process: its controller and one storage unit on loopback,
with a token of its own. The real store without Ray, for tests, notebooks and single
processes; `dataplane.store.start_store` is the same store in Ray actors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from dataplane.config import DataPlaneConfig
from dataplane.memory import auth
from dataplane.memory.controller import Controller
from dataplane.memory.unit import MemoryStorage
from dataplane.memory.wire import Server, Stub


async def serve_locally(config: DataPlaneConfig | None = None) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Start the store on this process's event loop; returns its address and a function that stops it."""
    config = config or DataPlaneConfig()
    token, limit = auth.new_token(), config.max_message_mb << 20
    unit = Server(MemoryStorage(0), MemoryStorage.RPC_METHODS, token, limit)
    unit_address = await unit.start("127.0.0.1")
    controller = Server(
        Controller(config, [Stub(unit_address, token)], [unit_address]), Controller.RPC_METHODS, token, limit
    )
    address = auth.address(token, await controller.start("127.0.0.1"))

    async def stop() -> None:
        await controller.close()
        await unit.close()

    return address, stop
