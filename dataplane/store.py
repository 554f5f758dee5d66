"""Starting a store on Ray, and finding one by name.

`start_store(config)` launches the storage units and the controller as named Ray actors
(each serving its plain class over the wire on the actor's event loop) and returns a
handle; `connect(name)` finds a running store from any process of the Ray cluster.
This is the only module of the data store that imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dataplane.client import StoreClient, SyncStoreClient
from dataplane.config import DataPlaneConfig
from dataplane.errors import DataPlaneError, StorageUnavailable
from dataplane.memory import auth
from dataplane.memory.controller import Controller
from dataplane.memory.unit import MemoryStorage
from dataplane.memory.wire import Server, Stub

NAMESPACE = "asyncflow"  # the Ray namespace of the store's named actors


class ServiceHost:
    """The body of a store actor: builds one service object and serves it over the wire.

    It listens where `dataplane.listen` says (loopback unless the store spans nodes) and
    admits only clients that prove they hold the store's token (`dataplane.memory.auth`).
    """

    def __init__(
        self, kind: str, config: dict, token: str, unit: int = 0, unit_addresses: list[str] | None = None
    ):
        self._kind, self._config, self._token = kind, DataPlaneConfig(**config), token
        self._unit, self._unit_addresses = unit, unit_addresses or []
        self._endpoint: str | None = None
        self._server: Server | None = None

    async def start(self) -> str:
        """Serve (once); returns host:port."""
        if self._endpoint is None:
            if self._kind == "unit":
                target: Any = MemoryStorage(self._unit)
            else:
                units = [Stub(a, self._token) for a in self._unit_addresses]
                target = Controller(self._config, units, self._unit_addresses)
            limit = self._config.max_message_mb << 20
            self._server = Server(target, target.RPC_METHODS, self._token, limit)
            self._endpoint = await self._server.start(listen_host(self._config.listen))
        return self._endpoint

    async def address(self) -> str:
        """The address clients connect with (it carries the token: only Ray processes can ask)."""
        return auth.address(self._token, await self.start())

    def node(self) -> str:
        return ray.util.get_node_ip_address()


def listen_host(listen: str) -> str:
    """The interface a store actor listens on: loopback, this node's IP, or the one given."""
    if listen == "loopback":
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if listen == "node" else listen


@dataclass
class StoreHandle:
    """A running store: its config, its actors and its controller's address."""

    config: DataPlaneConfig
    address: str
    controller: Any
    units: list[Any]

    def __repr__(self) -> str:
        from dataplane.config import redact_url

        name, backend = self.config.name, self.config.backend
        return f"StoreHandle(name={name!r}, backend={backend!r}, address={redact_url(self.address)!r})"

    def client(self) -> SyncStoreClient:
        """A blocking client (for the driver and plain scripts)."""
        return SyncStoreClient(self.address)

    async def async_client(self) -> StoreClient:
        return await StoreClient.connect(self.address)

    def shutdown(self) -> None:
        """Stop the store's actors. A Redis store has none: its rows stay (drop_partition deletes them)."""
        for actor in [self.controller, *self.units] if self.controller is not None else []:
            ray.kill(actor)


def _actor_name(store: str, role: str) -> str:
    return f"{store}.{role}"


def start_store(config: DataPlaneConfig | None = None) -> StoreHandle:
    """Launch a store's storage units and controller as named Ray actors (ray.init() first).

    With `backend: redis` nothing is launched: the store lives in Redis, every client runs its
    logic there, and the handle carries the address (`redis://...#<prefix>:<name>`).
    """
    config = config or DataPlaneConfig()
    if config.backend == "redis":
        from dataplane.redis.connection import open_store

        return StoreHandle(config, open_store(config), None, [])
    if not ray.is_initialized():
        raise DataPlaneError("start_store needs Ray: call ray.init() first (or run inside a Ray job)")
    host: Any = ray.remote(ServiceHost)  # actor handles: their methods are Ray's, untyped
    try:
        ray.get_actor(_actor_name(config.name, "controller"), namespace=NAMESPACE)
    except ValueError:
        pass  # no store of that name: good
    else:
        raise DataPlaneError(
            f"a store named {config.name!r} is already running in this Ray cluster; connect to it with "
            "dataplane.store.connect(name), or set dataplane.name to another name"
        )
    token = auth.new_token()
    # A store on loopback is reached only from its own node: its actors stay on the driver's node.
    here = (
        {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        }
        if config.listen == "loopback"
        else {}
    )
    units = [
        host.options(
            name=_actor_name(config.name, f"unit{i}"),
            namespace=NAMESPACE,
            num_cpus=config.storage_num_cpus,
            max_restarts=0,
            **here,
        ).remote("unit", config.model_dump(), token, unit=i)  # fmt: skip
        for i in range(config.num_storage_units)
    ]
    addresses = ray.get([u.start.remote() for u in units])
    controller = host.options(
        name=_actor_name(config.name, "controller"), namespace=NAMESPACE, num_cpus=config.controller_num_cpus,
        **here,
    ).remote("controller", config.model_dump(), token, unit_addresses=addresses)  # fmt: skip
    address = str(ray.get(controller.address.remote()))
    return StoreHandle(config, address, controller, units)


def store_address(name: str = "asyncflow") -> str:
    """The address of the running store `name` (looked up through Ray), token included."""
    actor = _lookup(name)
    address = ray.get(actor.address.remote())
    _check_reachable(name, address, ray.get(actor.node.remote()))
    return address


def _check_reachable(name: str, address: str, node: str) -> None:
    endpoint, _ = auth.parse(address)
    here = ray.util.get_node_ip_address()
    if endpoint.startswith(("127.", "[::1]")) and node != here:
        raise StorageUnavailable(
            f"store {name!r} listens on loopback of node {node}, and this process runs on {here}: set "
            "dataplane.listen: node for a store that processes on several nodes use"
        )


async def connect(name: str = "asyncflow") -> StoreClient:
    """An async client of the running store `name`; call from any process of the Ray cluster.

    `name` may instead be a Redis store's address (`redis://host:port/db#<prefix>:<name>`, the
    fragment defaulting to `asyncflow:asyncflow`): then no Ray is needed at all.
    """
    if name.startswith(("redis://", "rediss://", auth.SCHEME)):
        return await StoreClient.connect(name)
    actor = _lookup(name)
    address = await actor.address.remote()
    _check_reachable(name, address, await actor.node.remote())
    return await StoreClient.connect(address)


def _lookup(name: str):
    try:
        return ray.get_actor(_actor_name(name, "controller"), namespace=NAMESPACE)
    except ValueError:
        raise StorageUnavailable(
            f"no store named {name!r} runs in this Ray cluster; start one with start_store(), or check "
            "dataplane.name and that this process joined the right cluster (RAY_ADDRESS)"
        ) from None
