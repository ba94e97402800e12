"""The per-listener authenticator engines call: one object, every method the listener accepts.

Strategy: engines never parse tokens or certificates themselves; they call
this (built per listener by ``dbproxy.access``) and get a
``dbproxy.session.Identity`` or an ``AuthFailed`` whose ``reason`` goes to
the audit trail (never the token).
"""

from __future__ import annotations

from typing import Any

from ..errors import AuthFailed
from ..scram import SCRAM_SHA_256
from ..session import Identity
from .authority import ScramTokenServer, TokenAuthority
from .config import MtlsConfig
from .publickey import PublicKeyConfig
from .mtls import certificate_subject, peer_certificate


class ClientAuthenticator:
    """What one listener accepts (``methods``) and how to check it.  Engines call:

    - ``certificate_identity(stream)`` → Identity, None (no certificate), AuthFailed
    - ``verify_token(user, password)`` → Identity (cleartext / PLAIN / CQL password)
    - ``scram(user, mechanism)`` → ScramTokenServer
    - ``anonymous()`` → the listener's anonymous Identity
    """

    def __init__(self, methods: tuple[str, ...], *, authority: TokenAuthority | None, mtls: MtlsConfig | None, anonymous_roles: tuple[str, ...] = (),
                 publickey: PublicKeyConfig | None = None) -> None:
        self.methods = methods
        self.authority = authority
        self.mtls = mtls
        # The keys and user CA an engine that speaks SSH checks (``"publickey" in methods``).
        self.publickey = publickey if "publickey" in methods else None
        self.anonymous_roles = anonymous_roles

    @property
    def token(self) -> bool:
        return "token" in self.methods and self.authority is not None

    @property
    def scram_available(self) -> bool:
        return self.token and self.authority.registry is not None  # type: ignore[union-attr]

    def certificate_identity(self, stream: Any) -> Identity | None:
        if "mtls" not in self.methods or self.mtls is None:
            return None
        cert = peer_certificate(stream)
        if cert is None:
            return None
        subject = certificate_subject(cert, self.mtls.subject)
        if subject is None:
            raise AuthFailed(f"client certificate has no {self.mtls.subject}", reason="certificate_no_subject")
        return Identity(user=subject, roles=self.mtls.roles_for(subject), method="mtls")

    def verify_token(self, user: str | None, password: str | bytes) -> Identity:
        if not self.token:
            raise AuthFailed("token authentication is not enabled on this listener", reason="method_unavailable")
        return self.authority.verify_password(user, password)  # type: ignore[union-attr]

    def scram(self, user: str | None, mechanism: str = SCRAM_SHA_256) -> ScramTokenServer:
        if not self.token:
            raise AuthFailed("token authentication is not enabled on this listener", reason="method_unavailable")
        return self.authority.scram_server(user, mechanism)  # type: ignore[union-attr]

    def anonymous(self) -> Identity:
        return Identity(user="anonymous", roles=self.anonymous_roles, method="anonymous")
