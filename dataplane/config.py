"""Config of the streaming data store (`dataplane:` in a run config; `asyncflow.config`
re-exports it as a section of the run's tree).

Only numbers and names: nothing here imports the rest of the store, torch or Ray.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def redact_url(url: str) -> str:
    """`url` with its password (and a username that stands alone) replaced by `***`.

    The credentials are everything between `://` and the last `@`, so a password holding `#`,
    `/`, `?` or `@` unencoded (which a URL parser would take for the fragment, path, query or
    host) is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"


def without_password(url: str) -> str:
    """`url` with no credentials but a username."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"


class RedactedURL(str):
    """A URL whose repr hides the password, so a config printed or rejected never shows it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact_url(str(self)))


class Section(BaseModel):
    """A config section: unknown keys are errors, values are immutable once loaded; every field
    declares bounds and a description. (`asyncflow.config` builds its whole tree on this base.)"""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# Where a run directory's config points for a Redis password it must not store (see `public`).
RUN_PASSWORD_ENV = "ASYNCFLOW_REDIS_PASSWORD"


class RedisConfig(Section):
    """Where the Redis backend keeps rows and metadata, and how it talks to the server."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        min_length=8,
        max_length=2048,
        description="Server URL: redis://[user:password@]host:port/db, or rediss:// for TLS. The "
        "password is never logged or shown in errors.",
    )
    key_prefix: str = Field(
        "asyncflow",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Namespace of every key: keys are `<key_prefix>:<dataplane.name>:...`, so several "
        "stores (or unrelated applications) share one server safely.",
    )
    max_connections: int = Field(
        64,
        ge=2,
        le=10_000,
        description="Connections per client process, for plain commands and again for each of a get's "
        "script calls and cell reads; a get that waits holds one for its blocking read.",
    )
    socket_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest one command (or pipeline) may take before the connection counts as lost.",
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=600, description="Longest a TCP/TLS connect may take.")
    retry_deadline_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="How long a command is retried (exponential backoff) while the server is unreachable "
        "before StorageUnavailable is raised; covers a Redis restart.",
    )
    heartbeat_s: float = Field(
        1.0,
        gt=0,
        le=600,
        description="How often a client that holds leases says it is alive; leases of a client silent for "
        "3 heartbeats (its process died) are redelivered before lease_s ends.",
    )
    password_env: str | None = Field(
        None,
        max_length=256,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding the password (on Kubernetes, filled from a "
        "Secret), for a url without one; the process that starts the run reads it.",
    )
    ssl_ca_certs: str | None = Field(
        None, max_length=4096, description="rediss://: CA bundle that signed the server certificate."
    )
    ssl_certfile: str | None = Field(
        None, max_length=4096, description="rediss://: client certificate, for servers that require one."
    )
    ssl_keyfile: str | None = Field(None, max_length=4096, description="rediss://: client certificate's key.")
    ssl_cert_reqs: Literal["required", "optional", "none"] = Field(
        "required",
        description="rediss://: whether the server certificate must verify (`none` only for tests).",
    )

    @model_validator(mode="before")
    @classmethod
    def _hide_password(cls, data: Any) -> Any:
        # Before any check: a rejected URL is echoed in the error, and must not show its password.
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            data = {**data, "url": RedactedURL(data["url"])}
        return data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if any(c in userinfo for c in "#/?"):
            raise ValueError(
                f"the credentials of {redact_url(url)!r} hold '#', '/' or '?', which end a URL's host part; "
                "percent-encode them in the URL (%23, %2F, %3F), or give the password through password_env"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(
                f"expected redis://host:port/db or rediss://host:port/db, got {redact_url(url)!r}"
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"the port of {redact_url(url)!r} is not a number in 1..65535") from None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ValueError(f"the database of {redact_url(url)!r} must be a number, e.g. /0")
        return RedactedURL(url)

    def public(self) -> dict[str, Any]:
        """This section as it may be written to disk or printed: a password in the URL is taken
        out and `password_env` names RUN_PASSWORD_ENV instead, where a resumed run reads it."""
        data = self.model_dump(mode="json")
        url = str(self.url)
        if without_password(url) != url:
            data["url"] = without_password(url)
            data["password_env"] = RUN_PASSWORD_ENV
        return data

    @model_validator(mode="after")
    def _one_password(self) -> RedisConfig:
        if self.password_env and urlsplit(self.url).password:
            raise ValueError(
                f"url {redact_url(self.url)!r} carries a password and password_env names "
                f"{self.password_env!r}; keep one of them"
            )
        return self


class DataPlaneConfig(Section):
    """Where samples live between producers and consumers, and how long anyone waits."""

    backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Storage backend. `memory`: storage-unit Ray actors hold the bytes "
        "(default; needs nothing but Ray). `redis`: rows and metadata live in Redis "
        "(dataplane.redis), durable with AOF and reachable from any process by URL.",
    )
    name: str = Field(
        "asyncflow",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Store name: the controller and storage units are named Ray actors under it, "
        "so other processes attach with only this name.",
    )
    num_storage_units: int = Field(
        2, ge=1, le=256, description="Storage-unit actors holding encoded rows; more spreads memory and I/O."
    )
    capacity_rows: int = Field(
        4096,
        ge=1,
        le=10_000_000,
        description="Default rows a partition holds before `put` waits (back-pressure). A row is freed "
        "when every registered consumer has acked it.",
    )
    lease_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="How long a consumer holds rows it got before they are redelivered to another "
        "instance of that consumer (a dead consumer loses nothing).",
    )
    put_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Longest a `put` waits for free capacity before StoreTimeout."
    )
    get_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Longest a `get` waits for enough ready rows before StoreTimeout."
    )
    stale_policy: Literal["drop", "regenerate"] = Field(
        "drop",
        description="What happens to a row that falls out of a consumer's version window: `drop` it "
        "(counted), or `regenerate` it (its generated fields are cleared so the producer makes it again).",
    )
    listen: str = Field(
        "loopback",
        max_length=64,
        description="Where the memory store's actors listen: `loopback` (default; only processes on the "
        "driver's node reach it, and its actors stay there), `node` (the node's IP, for runs whose "
        "workers span nodes) or an IP address. Either way a client must hold the store's token.",
    )
    max_message_mb: int = Field(
        1024,
        ge=1,
        le=65_536,
        description="Largest message (MiB) a store actor accepts from a client, e.g. one put's fields "
        "for one storage unit; a larger put is refused before it is sent. Bounds what a peer can make "
        "the store allocate.",
    )
    controller_num_cpus: float = Field(
        0.1, ge=0, le=64, description="Logical CPUs Ray reserves for the controller actor (it is I/O bound)."
    )
    storage_num_cpus: float = Field(
        0.1, ge=0, le=64, description="Logical CPUs Ray reserves for each storage-unit actor."
    )
    redis: RedisConfig = Field(
        default_factory=RedisConfig, description="The Redis backend (used when backend is `redis`)."
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        if listen in ("loopback", "node"):
            return listen
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            raise ValueError(f"expected 'loopback', 'node' or an IP address, got {listen!r}") from None
        return listen
