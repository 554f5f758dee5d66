"""How the Redis backend talks to the server: addresses, connection pools, retries, errors.

An address is `redis://[user:password@]host:port/db[?ssl_...]#<key_prefix>:<name>`: the URL
redis-py reads (TLS options included) and the store's key namespace. Every command goes
through `call`, which retries while the server is unreachable and then raises
StorageUnavailable naming the URL without its password. Knows nothing about partitions.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from dataplane.config import RUN_PASSWORD_ENV, DataPlaneConfig, RedisConfig, redact_url
from dataplane.errors import (
    ConfigError,
    DataPlaneError,
    LeaseError,
    SchemaError,
    StorageUnavailable,
    UnknownPartition,
)
from dataplane.samplers import too_big

DEFAULT_NAMESPACE = "asyncflow:asyncflow"


def aioredis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise StorageUnavailable(
            "dataplane.backend: redis needs the redis package: pip install 'redis[hiredis]>=5.0' "
            "(in an AsyncFlow checkout: pip install -e '.[redis]')"
        ) from None
    return aioredis


def split_address(address: str) -> tuple[str, str]:
    """(server URL, key namespace) of a store address `redis://host:port/db#<prefix>:<name>`."""
    url, _, namespace = address.partition("#")
    return url, namespace or DEFAULT_NAMESPACE


def server_url(rc: RedisConfig) -> str:
    """`rc.url`, with the password from the environment variable `rc.password_env` if it names one."""
    if not rc.password_env:
        return rc.url
    password = os.environ.get(rc.password_env)
    if password is None:
        resumed = (
            " (a run directory never stores the password: export it under that name before --resume)"
            if rc.password_env == RUN_PASSWORD_ENV
            else ""
        )
        raise ConfigError(
            f"dataplane.redis.password_env names {rc.password_env!r}, but this process has no such "
            f"environment variable{resumed}; set it (the Kubernetes manifests fill it from the Redis "
            "Secret), or put the password in dataplane.redis.url"
        )
    parts = urlsplit(rc.url)
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def store_address(config: DataPlaneConfig) -> str:
    """The address a process needs to reach the store: the URL (with the TLS options as query
    arguments, which redis-py reads) and the key namespace after '#'."""
    rc, url = config.redis, server_url(config.redis)
    if url.startswith("rediss://"):
        tls = {k: v for k, v in rc.model_dump().items() if k.startswith("ssl_") and v is not None}
        url += ("&" if "?" in url else "?") + urlencode(tls)
    return f"{url}#{rc.key_prefix}:{config.name}"


def make_pool(url: str, rc: RedisConfig, sync: bool = False) -> Any:
    options: dict[str, Any] = {
        "max_connections": rc.max_connections,
        # async: `call` bounds a whole command (a pipeline: all of it) instead, once; redis-py's
        # own timeout is a context per reply read, a tenth of a small get's client time
        "socket_timeout": rc.socket_timeout_s if sync else None,
        "socket_connect_timeout": rc.connect_timeout_s,
        "timeout": None,  # wait for a free connection rather than fail
    }
    if url.startswith("rediss://"):
        options |= {"ssl_cert_reqs": rc.ssl_cert_reqs}
        options |= {k: v for k, v in rc.model_dump().items() if k.startswith("ssl_") and v is not None}
    if sync:
        import redis

        return redis.BlockingConnectionPool.from_url(url, **options)
    return aioredis().BlockingConnectionPool.from_url(url, **options)


def open_store(config: DataPlaneConfig) -> str:
    """Check that the server answers and leave the store's settings there; returns its address."""
    import redis

    rc = config.redis
    try:
        with redis.Redis(connection_pool=make_pool(server_url(rc), rc, sync=True)) as r:
            settings = config.model_dump(exclude={"redis"})
            settings["redis"] = rc.model_dump(exclude={"url", "password_env"})  # no secret
            r.set(f"{rc.key_prefix}:{config.name}:config", json.dumps(settings))
    except redis.exceptions.AuthenticationError as e:
        raise StorageUnavailable(
            f"Redis at {redact_url(rc.url)} refused the credentials ({e}); check the username and password "
            "in dataplane.redis.url and the server's ACL"
        ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise StorageUnavailable(
            f"RedisStorage cannot reach {redact_url(rc.url)} ({type(e).__name__}: {e}): is the server "
            "running? Start one (redis-server), fix dataplane.redis.url, or set dataplane.backend: memory"
        ) from None
    return store_address(config)


async def call(url: str, namespace: str, rc: RedisConfig, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args), retried with exponential backoff while the server is unreachable."""
    import redis.exceptions as exc

    delay, give_up = 0.05, None
    while True:
        try:
            try:
                async with asyncio.timeout(rc.socket_timeout_s):
                    result = await fn(*args, **kwargs)
            except TimeoutError:  # redis-py dropped the connection the command was cut off on
                raise exc.TimeoutError(f"no reply within socket_timeout_s={rc.socket_timeout_s:g}") from None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can swallow a cancellation that lands while it returns a connection
                # to the pool; a cancelled get must not go on to lease rows nobody takes.
                raise asyncio.CancelledError
            return result
        except exc.AuthenticationError as e:
            raise StorageUnavailable(
                f"Redis at {redact_url(url)} refused the credentials ({e}); check the username and "
                "password in dataplane.redis.url and the server's ACL"
            ) from None
        except (exc.ConnectionError, exc.TimeoutError) as e:
            now = time.monotonic()
            give_up = give_up or now + rc.retry_deadline_s
            if now >= give_up:
                raise StorageUnavailable(
                    f"cannot reach Redis at {redact_url(url)} for {rc.retry_deadline_s:.0f} s "
                    f"({type(e).__name__}: {e}): is redis-server running and reachable from this host? "
                    "Check dataplane.redis.url (host, port, TLS), the firewall and the server's log; "
                    "raise dataplane.redis.retry_deadline_s to ride out longer restarts, or set "
                    "dataplane.backend: memory"
                ) from None
            await asyncio.sleep(min(delay, max(give_up - now, 0.0)))
            delay = min(delay * 2, 1.0)
        except exc.ResponseError as e:
            if "NOPERM" in str(e):
                raise StorageUnavailable(
                    f"the Redis user of {redact_url(url)} may not run what the store needs ({e}); "
                    f"grant it +@all on keys ~{namespace}:* (or at least scripting, hash, sorted "
                    "set and stream commands)"
                ) from None
            raise


def script_error(
    partition: str, namespace: str, url: str, bits: dict[str, int], reply: list
) -> DataPlaneError:
    """The exception for a script's error reply, with the message the memory store gives."""
    kind = reply[1].decode()
    if kind == "unknown":
        return UnknownPartition(
            f"no partition {partition!r} in store {namespace!r} at {redact_url(url)}. Create "
            "it with create_partition(name, schema) first, or check the partition name and the store "
            "(dataplane.name, dataplane.redis.key_prefix)"
        )
    if kind == "lease":
        return LeaseError(f"row {int(reply[2])} of {partition!r}: this client does not hold its lease")
    if kind == "norow":
        return DataPlaneError(
            f"partition {partition!r} has no live row {int(reply[2])}: it was never put, or every "
            "consumer has acked it and it was freed"
        )
    if kind == "twice":
        names = [f for f, b in bits.items() if int(reply[3]) >> b & 1]
        return SchemaError(
            f"partition {partition!r}, row {int(reply[2])}: fields {names} were already written; a field "
            "is written once per row. Nothing of this put was stored."
        )
    if kind == "exists":
        return DataPlaneError(
            f"partition {partition!r} already exists with schema {schema_text(reply[2])}; pick another "
            "name, or pass exist_ok=True with the same schema to attach to it"
        )
    if kind == "notreg":
        return DataPlaneError(
            f"consumer {reply[2].decode()!r} is not registered on partition {partition!r} (registered: "
            f"{sorted(c.decode() for c in reply[3])}); pass it in create_partition(consumers=...) or "
            "call register_consumer first, so rows are kept until it has read them"
        )
    if kind == "toobig":
        return DataPlaneError(too_big(partition, int(reply[3]), int(reply[2])))
    if kind in ("consumers", "fields"):
        return DataPlaneError(
            f"partition {partition!r}: the Redis backend keeps at most 31 {kind} per partition; split "
            "the partition, or use dataplane.backend: memory"
        )
    return DataPlaneError(f"partition {partition!r}: the store answered {reply!r}")


def lease_error(partition: str, consumer: str, verb: str, detail: str) -> LeaseError:
    return LeaseError(
        f"cannot {verb} {detail.split(':')[0]} for consumer {consumer!r}: this client does not hold its "
        "lease (it expired and the row was redelivered, it was already acked, or it was never handed to this "
        f"client). Nothing was {verb}ed; process rows within lease_s or renew() the lease"
    )


def text(raw: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def schema_text(raw: bytes | str) -> dict[str, str]:
    return dict(json.loads(raw))
