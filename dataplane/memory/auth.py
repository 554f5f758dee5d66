"""Who may talk to a store: its token, its address, and the handshake that proves both sides hold it.

Every store has a secret token of its own, made when it starts. Clients get it inside the
store's address (`asyncflow://TOKEN@HOST:PORT`), which `start_store` returns and Ray hands to
the processes of the cluster (`dataplane.connect(name)`); nothing else knows it. Every
connection opens with a challenge both ways, before the server reads anything else:

    server -> client   {"hello": server nonce}
    client -> server   {"auth": HMAC(token, "client" + server nonce), "nonce": client nonce}
    server -> client   {"welcome": HMAC(token, "server" + client nonce), "max_message_bytes": N}
                       or {"refused": why}, and the server closes the connection

so the token never crosses the wire, a process without it gets nothing and changes nothing,
and a client never sends rows to a listener that is not its store. Proofs are compared in
constant time. This module knows nothing about sockets or rows.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from dataplane.errors import DataPlaneError

SCHEME = "asyncflow://"
NONCE_BYTES = 32
_ADDRESS = re.compile(
    r"^asyncflow://(?P<token>[0-9a-f]{64})@(?P<host>\[[0-9a-fA-F:.]+\]|[^:@/\s]+):(?P<port>\d{1,5})$"
)


def new_token() -> str:
    """A fresh store token: 256 random bits, as hex."""
    return secrets.token_hex(32)


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: str, role: str, challenge: bytes) -> bytes:
    """What a holder of `token` answers to `challenge` as `role` ("client" or "server")."""
    return hmac.new(bytes.fromhex(token), role.encode() + challenge, hashlib.sha256).digest()


def verify(token: str, role: str, challenge: bytes, answer: object) -> bool:
    return isinstance(answer, bytes) and hmac.compare_digest(proof(token, role, challenge), answer)


def address(token: str, host_port: str) -> str:
    """The address clients connect with: the store's endpoint and its token."""
    return f"{SCHEME}{token}@{host_port}"


def parse(store_address: str) -> tuple[str, str]:
    """(host:port, token) of a store address; DataPlaneError naming the expected form otherwise."""
    match = _ADDRESS.match(store_address)
    if match is None:
        shown = store_address.split("@")[-1] if "@" in store_address else store_address
        raise DataPlaneError(
            f"{shown!r} is not a data store address: expected asyncflow://TOKEN@HOST:PORT as start_store() "
            "returns it (its `address`), or reach a running store by name with dataplane.connect(name) "
            "from a process of its Ray cluster"
        )
    return f"{match['host']}:{match['port']}", match["token"]
