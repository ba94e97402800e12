"""SCRAM (RFC 5802) message parsing shared by every SCRAM server the proxy runs.

The proxy is a SCRAM *server* toward clients in several places (token logins
for Postgres and Mongo, Mongo's listener password); all of them read the
client-first-message the same way, so the parsing lives here once.
"""

from __future__ import annotations

import attrs

from .errors import RemoteProtocolError


def parse_attributes(message: bytes) -> dict[bytes, bytes]:
    """``a=value,b=value`` → {b"a": b"value", ...} (values may contain "="; first wins)."""
    out: dict[bytes, bytes] = {}
    for part in message.split(b","):
        key, sep, value = part.partition(b"=")
        if not sep or len(key) != 1:
            raise ValueError(f"malformed SCRAM attribute {part[:20]!r}")
        out.setdefault(key, value)
    return out


def unescape_saslname(raw: bytes) -> str:
    """RFC 5802 saslname: ``=2C`` is ",", ``=3D`` is "="; any other "=" is invalid."""
    text = raw.decode("utf-8")
    if "=" in text.replace("=3D", "").replace("=2C", ""):
        raise ValueError("invalid escape in SCRAM username")
    return text.replace("=2C", ",").replace("=3D", "=")


@attrs.frozen
class ClientFirst:
    user: str
    nonce: bytes
    bare: bytes = attrs.field(repr=False)
    gs2_header: bytes = attrs.field(repr=False)


def parse_client_first(message: bytes) -> ClientFirst:
    """Read ``n,,n=<user>,r=<nonce>``.  Channel binding (``p=``) is not offered by these servers."""
    message = bytes(message)
    try:
        cbind, _, rest = message.partition(b",")
        authzid, sep, bare = rest.partition(b",")
        if not sep or cbind not in (b"n", b"y"):
            raise ValueError("unsupported or missing GS2 channel-binding flag")
        if authzid and not authzid.startswith(b"a="):
            raise ValueError("malformed GS2 authzid")
        attributes = parse_attributes(bare)
        if b"m" in attributes:
            raise ValueError("unsupported SCRAM extension")
        user = unescape_saslname(attributes[b"n"])
        nonce = attributes[b"r"]
        if not nonce:
            raise ValueError("empty client nonce")
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(
            f"malformed SCRAM client-first-message: {exc}", client_hint="malformed SCRAM client-first-message"
        ) from None
    return ClientFirst(user, nonce, bare, message[: len(message) - len(bare)])
