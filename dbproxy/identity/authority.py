"""The token authority: a token checked against the user, the clock and the revocation list.

Strategy: ``TokenAuthority`` puts ``TokenCodec`` (signature), the revocation
file (re-read when it changes; unreadable = every token refused) and the
registry together.  A token arrives two ways: as a password (PG cleartext,
CQL PasswordAuthenticator, Mongo PLAIN) or through SCRAM, where
``ScramTokenServer`` (``dbproxy.scram.ScramServer`` over scramp) offers the
client's proof to each of the user's active tokens' verifiers; the one that
accepts it is the token used, and the proxy answers with that token's
ServerSignature.  An unknown user gets a stable fake salt (PostgreSQL's mock
authentication) and fails at the proof.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Iterable

from .. import scram
from ..errors import AuthFailed
from ..scram import SCRAM_SHA_256, ScramFlavour
from ..session import Identity
from .config import TokenConfig
from .files import WatchedFile, parse_revocations
from .keys import TokenKeys
from .registry import DEFAULT_FLAVOURS, SCRAM_ITERATIONS, RegistryEntry, TokenRegistry
from .tokens import TokenClaims, TokenCodec


class TokenAuthority:
    """Tokens as a whole: codec + revocation list + SCRAM registry, from ``identity.token``."""

    def __init__(self, cfg: TokenConfig, keys: TokenKeys | None = None, *, flavours: Iterable[ScramFlavour] = DEFAULT_FLAVOURS) -> None:
        """``flavours``: the SCRAM verifiers ``token issue`` records (the engines' ``scram_flavours``)."""
        self.cfg = cfg
        self.keys = keys or TokenKeys.from_config(cfg)
        self.codec = TokenCodec(self.keys, issuer=cfg.issuer, leeway=cfg.leeway)
        self.revocations = WatchedFile(cfg.revocation_file, parse_revocations, frozenset())
        self.registry = TokenRegistry(cfg.registry_file, self.keys, flavours) if cfg.registry_file else None
        # PostgreSQL-style mock authentication: a fake but stable salt for unknown users.
        self._mock_key = secrets.token_bytes(32)

    def _revoked_ids(self) -> frozenset[str]:
        try:
            return self.revocations.get()
        except OSError as exc:
            # Fail closed: if the proxy cannot tell whether a token is revoked, no token is good.
            raise AuthFailed(f"revocation list unreadable: {exc.strerror or exc}", reason="revocation_list_unreadable") from None

    def revoked(self, jti: str) -> bool:
        return jti in self._revoked_ids()

    def _accept(self, claims: TokenClaims, user: str | None, now: float | None) -> Identity:
        if user is not None and claims.sub != user:
            raise AuthFailed(f"token {claims.jti} is for {claims.sub!r}, not {user!r}", reason="token_wrong_user", token_id=claims.jti)
        self.codec.check_time(claims, now)
        if self.revoked(claims.jti):
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} is revoked", reason="token_revoked", token_id=claims.jti)
        return Identity(user=claims.sub, roles=claims.roles, method="token", token_id=claims.jti)

    def verify_password(self, user: str | None, password: str | bytes, *, now: float | None = None) -> Identity:
        """A token presented as a password (PG cleartext, CQL PasswordAuthenticator, Mongo PLAIN)."""
        return self._accept(self.codec.decode(password), user, now)

    def scram_candidates(self, user: str, mechanism: str, *, now: float | None = None) -> tuple[bytes, int, list[RegistryEntry]]:
        """(salt, iterations, entries to test) for one login; a mock salt and no entries if none."""
        now = time.time() if now is None else now
        entries = []
        if self.registry is not None:
            revoked = self._revoked_ids()
            entries = [
                e for e in self.registry.for_user(user)
                if mechanism in e.scram and e.claims.jti not in revoked and now < e.claims.exp + self.codec.leeway
            ]
        if entries:
            newest = max(entries, key=lambda e: e.claims.iat).scram[mechanism]
            same = [e for e in entries if e.scram[mechanism].salt == newest.salt and e.scram[mechanism].iterations == newest.iterations]
            return newest.salt, newest.iterations, same
        # A keyed hash, not SCRAM: the same fake salt every time for this name (PostgreSQL's
        # scram_mock_salt hashes a per-cluster nonce with the name the same way).
        mock = hmac.digest(self._mock_key, f"{mechanism}\0{user}".encode("utf-8"), "sha256")[:16]
        return mock, SCRAM_ITERATIONS, []

    def scram_server(self, user: str | None, mechanism: str = SCRAM_SHA_256) -> "ScramTokenServer":
        if self.registry is None:
            raise AuthFailed("SCRAM needs identity.token.registry_file", reason="method_unavailable")
        return ScramTokenServer(self, mechanism, user)


# --------------------------------------------------------------------------- SCRAM server


class ScramTokenServer:
    """One SCRAM conversation (RFC 5802 server side) against a user's active tokens.  Single use.

    ``user``: the login name when the protocol carries it outside SCRAM
    (Postgres: the startup packet; the SCRAM ``n=`` is ignored, as
    PostgreSQL does); ``None`` takes it from ``n=`` (Mongo).  The exchange is
    ``dbproxy.scram.ScramServer`` with one candidate per active token.

        srv = authority.scram_server(user, "SCRAM-SHA-256")
        send(srv.server_first(client_first))     # r=…,s=…,i=…
        send(srv.server_final(client_final))     # v=…   (raises AuthFailed)
        srv.identity                             # the Identity of the matching token
    """

    def __init__(self, authority: TokenAuthority, mechanism: str, user: str | None) -> None:
        if mechanism not in scram.MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        self.authority = authority
        self.mechanism = mechanism
        self.identity: Identity | None = None
        self._entries: list[RegistryEntry] = []
        self._server = scram.ScramServer(mechanism, self._candidates, user=user)

    @property
    def user(self) -> str | None:
        return self._server.user

    def _candidates(self, user: str) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
        salt, iterations, self._entries = self.authority.scram_candidates(user, self.mechanism)
        keys = [(e.scram[self.mechanism].stored_key, e.scram[self.mechanism].server_key) for e in self._entries]
        return salt, iterations, keys

    def server_first(self, client_first: bytes) -> bytes:
        return self._server.server_first(client_first)

    def server_final(self, client_final: bytes) -> bytes:
        try:
            final = self._server.server_final(client_final)
        except scram.ScramFailed as exc:
            if exc.reason == "scram_no_match":
                raise AuthFailed(f"no active token of {self.user!r} matches the SCRAM proof", reason="scram_no_match") from None
            raise AuthFailed(str(exc), reason=exc.reason) from None
        assert self._server.matched is not None
        # Revocation/expiry were filtered at server_first; check again (the file may have changed).
        self.identity = self.authority._accept(self._entries[self._server.matched].claims, self.user, None)
        return final
