"""Kerberos (GSSAPI) credentials the proxy uses to prove its own identity to backends.

Strategy: one ``KerberosCredential`` per (principal, keytab/ccache) pair,
shared by every session of every route that names it.  Acquisition talks to
the KDC and so can block: it runs in a worker thread, behind a ``trio.Lock``
so twenty sessions arriving together cause one acquisition, not twenty.  A
credential is re-acquired when its remaining lifetime falls under
``renew_margin`` (or a third of its original lifetime, whichever is larger).

A security context is engine-neutral: ``GssInitiator`` steps tokens (the
first step fetches a service ticket — a KDC round trip — so steps run in a
thread too), then offers ``wrap``/``unwrap`` for GSS-encrypted links.  The
Postgres engine uses it for AuthenticationGSS and GSSENC; the Cassandra SASL
GSSAPI mechanism can use the same object.

Errors: every GSS failure becomes ``UpstreamError(kind="auth")`` whose
message carries the Kerberos detail (for the log and the audit event) and
whose ``client_hint`` says only that the proxy could not authenticate.

MIT Kerberos reads ``KRB5_CONFIG`` from the environment whenever it creates a
context, so one process uses one krb5 configuration: routes that name a
``krb5_config`` must agree (the validator checks), and it is exported once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from .errors import UpstreamError

log = logging.getLogger("dbproxy.kerberos")

CLIENT_HINT = "the proxy could not authenticate to the backend database (Kerberos)"


def _gssapi():
    try:
        import gssapi  # noqa: PLC0415 - optional dependency, imported where Kerberos is configured
    except ImportError as exc:  # pragma: no cover - install problem
        raise UpstreamError(f"the gssapi package is not installed: {exc}", kind="auth", client_hint=CLIENT_HINT)
    return gssapi


class KerberosCredential:
    def __init__(self, *, principal: str | None, keytab: str | None, ccache: str | None, renew_margin: float = 300.0) -> None:
        self.principal = principal
        self.keytab = keytab
        self.ccache = ccache
        self.renew_margin = renew_margin
        self._creds: Any = None
        self._expires_at = 0.0
        self._lifetime = 0.0
        self._lock = trio.Lock()
        self.acquisitions = 0

    def _acquire_blocking(self) -> tuple[Any, float]:
        gssapi = _gssapi()
        store: dict[bytes | str, bytes | str] = {}
        if self.keytab:
            store["client_keytab"] = self.keytab
            # A private in-memory cache per credential: never touches the operator's ccache.
            store["ccache"] = f"MEMORY:dbproxy-{id(self)}-{self.acquisitions}"
        elif self.ccache:
            store["ccache"] = self.ccache
        name = gssapi.Name(self.principal, gssapi.NameType.kerberos_principal) if self.principal else None
        creds = gssapi.Credentials(name=name, usage="initiate", store=store or None)
        lifetime = creds.lifetime
        if lifetime is None:
            lifetime = 8 * 3600
        if lifetime <= 0:
            raise gssapi.exceptions.ExpiredCredentialsError(0, 0)
        return creds, float(lifetime)

    async def get(self) -> Any:
        now = time.monotonic()
        if self._creds is not None and now < self._renew_at():
            return self._creds
        async with self._lock:
            now = time.monotonic()
            if self._creds is not None and now < self._renew_at():
                return self._creds
            try:
                creds, lifetime = await trio.to_thread.run_sync(self._acquire_blocking)
            except UpstreamError:
                raise
            except Exception as exc:
                raise UpstreamError(
                    f"Kerberos: could not acquire credentials for {self.principal or 'default principal'}"
                    f" from {'keytab ' + self.keytab if self.keytab else 'ccache ' + str(self.ccache)}: {_describe(exc)}",
                    kind="auth",
                    client_hint=CLIENT_HINT,
                ) from None
            self.acquisitions += 1
            self._creds = creds
            self._lifetime = lifetime
            self._expires_at = time.monotonic() + lifetime
            log.info("Kerberos credentials acquired for %s (lifetime %.0fs)", self.principal, lifetime)
            return creds

    def _renew_at(self) -> float:
        margin = max(self.renew_margin, self._lifetime / 3)
        return self._expires_at - margin

    def invalidate(self) -> None:
        """Forget the cached credential (e.g. after the backend rejected a ticket)."""
        self._creds = None


class CredentialCache:
    """All Kerberos credentials of the process, keyed by where they come from."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, KerberosCredential] = {}

    def for_auth(self, params: dict) -> KerberosCredential:
        key = (params.get("principal"), params.get("keytab_file"), params.get("ccache"))
        cred = self._by_key.get(key)
        if cred is None:
            cred = self._by_key[key] = KerberosCredential(
                principal=key[0], keytab=key[1], ccache=key[2], renew_margin=float(params.get("renew_margin_seconds", 300))
            )
        return cred


def maybe_credential_cache(config: Any) -> CredentialCache | None:
    krb5_configs = set()
    any_gss = False
    for lc in config.listeners:
        for route in lc.routes:
            if route.backend.auth.method == "gssapi":
                any_gss = True
                if route.backend.auth.params.get("krb5_config"):
                    krb5_configs.add(route.backend.auth.params["krb5_config"])
    if not any_gss:
        return None
    if krb5_configs:
        (path,) = krb5_configs  # the validator guarantees one
        os.environ["KRB5_CONFIG"] = path
    return CredentialCache()


def _describe(exc: BaseException) -> str:
    gen = getattr(exc, "gen_message", None)
    if callable(gen):
        try:
            return f"{gen()} ({exc.__class__.__name__})"
        except Exception:
            pass
    return f"{exc.__class__.__name__}: {exc}"


class GssInitiator:
    """A client-side GSS security context toward one service."""

    def __init__(self, creds: Any, service: str, host: str, *, mutual: bool = True, confidential: bool = False) -> None:
        gssapi = _gssapi()
        self.target = f"{service}@{host}"
        flags = gssapi.RequirementFlag.mutual_authentication if mutual else 0
        flags |= gssapi.RequirementFlag.out_of_sequence_detection
        if confidential:
            flags |= gssapi.RequirementFlag.confidentiality | gssapi.RequirementFlag.integrity
        self._ctx = gssapi.SecurityContext(
            name=gssapi.Name(self.target, gssapi.NameType.hostbased_service),
            creds=creds,
            usage="initiate",
            flags=flags,
        )

    @property
    def complete(self) -> bool:
        return bool(self._ctx.complete)

    async def step(self, token: bytes | None) -> bytes | None:
        try:
            return await trio.to_thread.run_sync(self._ctx.step, token)
        except Exception as exc:
            raise UpstreamError(
                f"Kerberos: security context with {self.target} failed: {_describe(exc)}",
                kind="auth",
                client_hint=CLIENT_HINT,
            ) from None

    def wrap(self, data: bytes) -> bytes:
        return self._ctx.wrap(data, True).message

    def unwrap(self, data: bytes) -> bytes:
        return self._ctx.unwrap(data).message

    def max_wrap_input(self, output_limit: int) -> int:
        return self._ctx.get_wrap_size_limit(output_limit, True)
