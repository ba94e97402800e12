"""Kerberos (GSSAPI) credentials the proxy uses to prove its own identity to backends.

Strategy: one ``KerberosCredential`` per (principal, keytab/ccache) pair,
shared by every session of every route that names it.  Acquisition talks to
the KDC and so can block: it runs in a worker thread started by a task in
the server's background nursery, and every session that needs the credential meanwhile waits on
that one attempt — twenty sessions arriving together cause one acquisition,
and one failure answers them all.  Sessions wait with their own deadlines;
the attempt outlives a session that gives up.  A credential is renewed when
its remaining lifetime falls under ``renew_margin`` (or a third of its
original lifetime, whichever is larger): in the background while the current
ticket is still good, so no session waits for the KDC.  With a keytab each
acquisition fills a fresh private MEMORY ccache; with ``ccache`` it re-reads
the operator's cache (kept fresh by kinit/k5start), which is the only way a
GSS credential handle picks up a newer ticket.

A security context is engine-neutral: ``GssInitiator`` steps tokens (the
first step fetches a service ticket — a KDC round trip — so steps run in a
thread too), then offers ``wrap``/``unwrap`` for GSS-encrypted links.  The
Postgres engine uses it for AuthenticationGSS and GSSENC.  ``SaslGssapi``
runs the SASL "GSSAPI" mechanism of RFC 4752 over one (the context tokens,
then the security-layer exchange: unwrap the server's 4 octets, answer
"no security layer" wrapped): what protocols that carry SASL (Cassandra's
AUTH_RESPONSE/AUTH_CHALLENGE, Mongo's saslStart) need; the layer bytes are
the sans-IO ``sasl_gssapi_layer_reply``.

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
        raise UpstreamError(f"the gssapi package is not installed ({INSTALL_HINT}): {exc}", kind="auth", client_hint=CLIENT_HINT)
    return gssapi


class CredentialsExpired(Exception):
    pass


# Never hand out a credential closer to its expiry than this (the backend must
# still accept the service ticket when our token reaches it).
EXPIRY_SLACK = 5.0
# After a failed background renewal, sessions keep the current credential and
# the next renewal is tried no sooner than this.
RETRY_AFTER = 5.0


class _Attempt:
    """One acquisition in flight; every session that needs it waits on ``done``."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.creds: Any = None
        self.error: str | None = "Kerberos: credential acquisition was cancelled"


class KerberosCredential:
    def __init__(self, *, principal: str | None, keytab: str | None, ccache: str | None, renew_margin: float = 300.0) -> None:
        self.principal = principal
        self.keytab = keytab
        self.ccache = ccache
        self.renew_margin = renew_margin
        self._creds: Any = None
        self._expires_at = 0.0
        self._lifetime = 0.0
        self._attempt: _Attempt | None = None
        self._attempts = 0
        self._last_failure = float("-inf")
        self.acquisitions = 0
        # The server's background nursery; acquisitions run there so none outlives the server.
        self.nursery: trio.Nursery | None = None

    def _acquire_blocking(self, serial: int) -> tuple[Any, float, str]:
        gssapi = _gssapi()
        store: dict[bytes | str, bytes | str] = {}
        if self.keytab:
            store["client_keytab"] = self.keytab
            # A private in-memory cache per acquisition: never touches the operator's
            # ccache, and a renewal really fetches a new TGT instead of finding the old one.
            store["ccache"] = f"MEMORY:dbproxy-{id(self)}-{serial}"
        elif self.ccache:
            store["ccache"] = self.ccache
        name = gssapi.Name(self.principal, gssapi.NameType.kerberos_principal) if self.principal else None
        creds = gssapi.Credentials(name=name, usage="initiate", store=store or None)
        lifetime = creds.lifetime
        if lifetime is None:
            lifetime = 8 * 3600
        if lifetime <= 0:
            raise CredentialsExpired("the credentials have expired (no valid ticket)")
        return creds, float(lifetime), str(creds.name)

    async def get(self) -> Any:
        """A usable credential; acquires (once for all waiting sessions) or renews as needed."""
        now = time.monotonic()
        if self._creds is not None:
            usable_until = self._expires_at - EXPIRY_SLACK
            if now < min(self._renew_at(), usable_until):
                return self._creds
            if now < usable_until:
                # Due for renewal but still good: renew in the background, don't make
                # this session wait for the KDC.
                if self._attempt is None and now - self._last_failure >= RETRY_AFTER:
                    self._start_attempt()
                return self._creds
        attempt = self._attempt or self._start_attempt()
        await attempt.done.wait()
        if attempt.error is not None:
            raise UpstreamError(attempt.error, kind="auth", client_hint=CLIENT_HINT)
        return attempt.creds

    def _start_attempt(self) -> _Attempt:
        attempt = self._attempt = _Attempt()
        self._attempts += 1
        name = f"kerberos acquire {self.principal}"
        if self.nursery is not None:
            self.nursery.start_soon(self._run_attempt, attempt, self._attempts, name=name)
        else:  # no server around (tools, unit tests): trio's system nursery owns it
            trio.lowlevel.spawn_system_task(self._run_attempt, attempt, self._attempts, name=name)
        return attempt

    async def _run_attempt(self, attempt: _Attempt, serial: int) -> None:
        # Owned by the server's background nursery, not by a session: a session
        # that gives up (connect timeout, client gone) must not abandon the
        # acquisition others wait for.
        # The blocking call runs in a thread; a hung KDC ties up that thread only.
        try:
            creds, lifetime, name = await trio.to_thread.run_sync(_described, self._acquire_blocking, serial, abandon_on_cancel=True)
        except Exception as exc:
            attempt.error = (
                f"Kerberos: could not acquire credentials for {self.principal or 'the default principal'}"
                f" from {'keytab ' + self.keytab if self.keytab else 'ccache ' + str(self.ccache)}: {_describe(exc)}"
            )
            self._last_failure = time.monotonic()
            log.warning("%s", attempt.error)
        else:
            self.acquisitions += 1
            self._creds, self._lifetime = creds, lifetime
            self._expires_at = time.monotonic() + lifetime
            attempt.creds, attempt.error = creds, None
            log.info("Kerberos credentials acquired for %s (lifetime %.0fs, renewal in %.0fs)",
                     name, lifetime, self._renew_at() - time.monotonic())
        finally:
            if self._attempt is attempt:
                self._attempt = None
            attempt.done.set()

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
        self.nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run acquisitions and renewals in ``nursery`` (the server's background nursery)."""
        self.nursery = nursery
        for cred in self._by_key.values():
            cred.nursery = nursery

    def for_auth(self, params: dict) -> KerberosCredential:
        key = (params.get("principal"), params.get("keytab_file"), params.get("ccache"))
        cred = self._by_key.get(key)
        if cred is None:
            cred = self._by_key[key] = KerberosCredential(
                principal=key[0], keytab=key[1], ccache=key[2], renew_margin=float(params.get("renew_margin_seconds", 300))
            )
            cred.nursery = self.nursery
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


INSTALL_HINT = "pip install 'dbproxy[kerberos]'"


GSSAPI_KEYS = frozenset({"principal", "keytab_file", "ccache", "service", "host", "krb5_config", "renew_margin_seconds"})


def validate_gssapi(v: Any, ad: dict, path: str, keys: set, *, extra_keys: dict | None = None) -> dict:
    """A backend ``auth`` object of method ``gssapi``, for any engine: the shared Kerberos keys
    (``GSSAPI_KEYS``) plus the engine's own (``extra_keys``: key → allowed values); ``keys`` are
    the object's keys besides method/password ones.  Returns the engine's auth params."""
    extra_keys = extra_keys or {}
    allowed = GSSAPI_KEYS | set(extra_keys)
    params: dict = {}
    check_gssapi_installed(v, path)
    for k in sorted(set(keys) - allowed):
        v.err(f"{path}.{k}", f"a gssapi key ({', '.join(sorted(allowed))})")
    if "keytab_file" in ad and "ccache" in ad:
        v.err(path, "only one of \"keytab_file\" or \"ccache\"")
    if "keytab_file" not in ad and "ccache" not in ad:
        v.err(path, "\"keytab_file\" or \"ccache\" for method gssapi")
    for key in ("principal", "service", "host", "ccache"):
        if key in ad:
            val = v.string(ad, key, path)
            if val:
                params[key] = val
    for key in ("keytab_file", "krb5_config"):
        if key in ad:
            f = v.file_path(ad, key, path)
            if f:
                params[key] = f
    check_krb5_config(v, path, params.get("krb5_config"))
    for key, choices in extra_keys.items():
        if key in ad:
            val = v.string(ad, key, path, choices=choices)
            if val:
                params[key] = val
    if "renew_margin_seconds" in ad:
        val = v.number(ad, "renew_margin_seconds", path)
        if val is not None:
            params["renew_margin_seconds"] = val
    return params


def check_gssapi_installed(v: Any, path: str) -> None:
    """Config validation: a route with backend auth ``gssapi`` needs the optional ``gssapi``
    package; say so at ``check-config`` / start-up, not at the first session."""
    try:
        import gssapi  # noqa: F401, PLC0415 - optional dependency
    except ImportError as exc:
        v.err(
            f"{path}.method",
            f"the gssapi package for method \"gssapi\" ({INSTALL_HINT}; it builds against libkrb5-dev),"
            f" but it cannot be imported: {exc}",
        )


def check_krb5_config(v: Any, path: str, krb5_config: str | None) -> None:
    """Config validation: every route naming a ``krb5_config`` must name the same one.

    ``v`` is the config validator; the first route's choice is remembered on it.
    """
    if not krb5_config:
        return
    first = v.__dict__.setdefault("kerberos_krb5_config", (krb5_config, path))
    if first[0] != krb5_config:
        v.err(
            f"{path}.krb5_config",
            f"the krb5_config of {first[1]} ({first[0]}): one process reads one KRB5_CONFIG, got {krb5_config}",
        )


class _Failed(Exception):
    """A GSS failure already described where it happened (see ``_described``)."""


def _described(fn: Any, *args: Any) -> Any:
    """Run a blocking GSS call; on failure raise ``_Failed`` with its description.

    MIT keeps the detailed text of a failure (\"Server nosuch/db@REALM not found
    in Kerberos database\") in thread-local storage, so the description must be
    produced in the worker thread that failed, not back in the trio thread.
    """
    try:
        return fn(*args)
    except Exception as exc:
        raise _Failed(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _Failed):
        return str(exc)
    gen = getattr(exc, "gen_message", None)
    if callable(gen):
        try:
            return f"{gen()} ({exc.__class__.__name__})"
        except Exception:
            pass
    return f"{exc.__class__.__name__}: {exc}"


class GssInitiator:
    """A client-side GSS security context toward one service."""

    def __init__(self, creds: Any, service: str, host: str, *, mutual: bool = True, confidential: bool = False,
                 integrity: bool = False) -> None:
        gssapi = _gssapi()
        self.target = f"{service}@{host}"
        flags = gssapi.RequirementFlag.mutual_authentication if mutual else 0
        flags |= gssapi.RequirementFlag.out_of_sequence_detection
        if confidential:
            flags |= gssapi.RequirementFlag.confidentiality | gssapi.RequirementFlag.integrity
        elif integrity:  # wrap/unwrap without confidentiality (the SASL GSSAPI layer exchange)
            flags |= gssapi.RequirementFlag.integrity
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
            # The first step may ask the KDC for a service ticket: a thread, and
            # abandoned if the session's deadline passes (the context is per session).
            return await trio.to_thread.run_sync(_described, self._ctx.step, token, abandon_on_cancel=True)
        except Exception as exc:
            raise UpstreamError(
                f"Kerberos: security context with {self.target} failed: {_describe(exc)}",
                kind="auth",
                client_hint=CLIENT_HINT,
            ) from None

    def wrap(self, data: bytes, confidential: bool = True) -> bytes:
        return self._ctx.wrap(data, confidential).message

    def unwrap(self, data: bytes) -> bytes:
        return self._ctx.unwrap(data).message

    def max_wrap_input(self, output_limit: int) -> int:
        return self._ctx.get_wrap_size_limit(output_limit, True)


# --------------------------------------------------------------------------- SASL GSSAPI (RFC 4752)

SASL_LAYER_NONE = 0x01  # RFC 4752 3.3: the security layer bit-mask
SASL_LAYER_INTEGRITY = 0x02
SASL_LAYER_CONFIDENTIALITY = 0x04


class SaslLayerError(ValueError):
    """The server's security-layer offer (RFC 4752 3.1) is not one the proxy can accept."""


def sasl_gssapi_layer_reply(offer: bytes, authzid: str = "") -> bytes:
    """The cleartext of the client's last SASL GSSAPI message, from the server's unwrapped offer.

    RFC 4752 3.1: the offer is exactly 4 octets — a bit-mask of the security
    layers the server supports, then the largest message it can receive (3
    octets, network order).  The answer is the selected layer, the client's
    largest message (0: no layer), then the authorization identity in UTF-8
    with no terminating NUL; the caller wraps it with conf_flag FALSE.

    The proxy selects "no security layer" (CQL and the other protocols it
    relays have none of their own; TLS protects the link).  RFC 4752 also has
    the client check that the size is 0 when the server offers no layer;
    the JDK's GSSAPI server (com.sun.security.sasl.gsskerb, behind Cassandra
    Kerberos authenticators) sends its receive-buffer size (65536) anyway —
    seen against Cassandra 5.0.9 on JDK 17 — so the size is ignored: it only
    matters for a layer, and none is selected.
    """
    if len(offer) != 4:
        raise SaslLayerError(f"the server's security-layer offer is {len(offer)} octets, RFC 4752 3.1 requires 4")
    mask = offer[0]
    if not mask & SASL_LAYER_NONE:
        raise SaslLayerError(
            f"the server requires a SASL security layer (offer bit-mask {mask:#04x}); the proxy supports only"
            " \"no security layer\" (RFC 4752 3.3)"
        )
    return bytes((SASL_LAYER_NONE, 0, 0, 0)) + authzid.encode("utf-8")


class SaslGssapi:
    """The client side of SASL GSSAPI (RFC 4752 3.1) over a ``GssInitiator``.

    ``initial()`` is the first context token; ``respond(challenge)`` answers
    each server challenge: context tokens until the context completes (an
    empty response when completing produced no token), then the wrapped
    security-layer answer to the server's wrapped offer.  ``done`` once that
    answer is out: only then is the server authenticated (its offer passed
    GSS_Unwrap under the established context).  ``authzid`` empty lets the
    server derive the authorization identity from the principal.
    """

    def __init__(self, initiator: GssInitiator, authzid: str = "") -> None:
        self.initiator = initiator
        self.authzid = authzid
        self.done = False

    async def initial(self) -> bytes:
        token = await self.initiator.step(None)
        return token or b""

    async def respond(self, challenge: bytes | None) -> bytes:
        if self.done:
            raise self._error("the server sent another challenge after the SASL GSSAPI exchange had ended")
        if not self.initiator.complete:
            token = await self.initiator.step(challenge or b"")
            return token or b""
        if not challenge:
            raise self._error("the server sent an empty challenge where RFC 4752 3.1 expects its wrapped security-layer offer")
        try:
            offer = self.initiator.unwrap(challenge)
            reply = self.initiator.wrap(sasl_gssapi_layer_reply(offer, self.authzid), confidential=False)
        except SaslLayerError as exc:
            raise self._error(str(exc)) from None
        except Exception as exc:  # a GSSError: the offer was not wrapped under this context
            raise self._error(f"the server's security-layer offer failed GSS_Unwrap: {_describe(exc)}") from None
        self.done = True
        return reply

    def _error(self, detail: str) -> UpstreamError:
        return UpstreamError(f"Kerberos: SASL GSSAPI with {self.initiator.target}: {detail}", kind="auth", client_hint=CLIENT_HINT)
