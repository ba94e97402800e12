"""mTLS identities: the subject of a client certificate the listener's TLS context verified.

Strategy: the chain is verified by the TLS handshake against
``client_ca_file``; here only the identity is read from the verified
certificate — its subject CN or its first SAN URI
(``identity.mtls.subject``); roles come from ``identity.mtls.users``.
"""

from __future__ import annotations

from typing import Any


def certificate_subject(cert: dict | None, source: str = "cn") -> str | None:
    """The identity in a verified peer certificate (``ssl`` dict form), or None if there is none."""
    if not cert:
        return None
    if source == "san_uri":
        for kind, value in cert.get("subjectAltName", ()):
            if kind == "URI" and value:
                return value
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return value
    return None


def peer_certificate(stream: Any) -> dict | None:
    """The verified client certificate of a TLS stream (trio.SSLStream), or None."""
    getpeercert = getattr(stream, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return getpeercert() or None
    except ValueError:  # handshake not done
        return None
