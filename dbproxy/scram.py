"""SCRAM (RFC 5802, RFC 7677) for every protocol and both roles, through ``scramp``.

Strategy.  The SCRAM arithmetic (PBKDF2, HMACs, proofs, signatures,
channel-binding input) and the message grammar are scramp's; this module is
the one place the proxy drives it, so the Postgres engine (client of the
backend), the Mongo engine (client of the backend, server toward clients)
and ``dbproxy.identity`` (the token server) share one implementation.  What
stays here is what the protocols decide differently from scramp's defaults:

- **The user name goes out verbatim.**  libpq sends an empty ``n=``
  (PostgreSQL ignores it and uses the startup packet's user; fe-auth-scram.c)
  and Mongo does not SASLprep user names (auth.md); scramp SASLpreps names
  and refuses an empty one.  The client therefore sends ``n=<escaped name>``
  itself and hands scramp that client-first-message-bare
  (``client_first_bare``, the attribute scramp builds the AuthMessage from).
  The server parses the name with ``parse_client_first`` and gives scramp the
  message with a placeholder name, then the client's own bare again, so the
  AuthMessage is the bytes the client signed.
- **The password is the bytes the protocol prepared.**  PostgreSQL SASLpreps
  but falls back to the raw bytes (src/common/saslprep.c); Mongo's
  SCRAM-SHA-1 hashes ``md5(user:mongo:password)``.  scramp only takes text it
  SASLpreps itself, so the client gives scramp those bytes (``password``:
  scramp hashes ``bytes(password)``).
- **Policy**: the iteration ceiling a backend may ask for (scramp's floor is
  4096, its ceiling 10,000,000); wording errors in the proxy's terms.
- **"The proof selects the verifier"** (``ScramServer`` with several
  candidates, used by the token registry: every token of a user shares one
  salt, and only the client-final-message says which token was used): one
  scramp server per candidate, all with the same nonce, salt and iteration
  count, so they send the same server-first-message; the client-final goes to
  each until one accepts the proof.  An unknown user gets one candidate with
  random keys (and the caller's stable mock salt), so it fails at the proof
  like any wrong password (PostgreSQL's mock authentication).

Verifiers (salt, StoredKey, ServerKey, iterations) come from
``make_verifier`` (scramp's ``make_auth_info``).  A ``ScramFlavour`` says
how one protocol turns a secret into what SCRAM hashes; the token registry
keeps one verifier per flavour, and an engine that needs another (Mongo's
SCRAM-SHA-1 digest) declares it (``Engine.scram_flavours``).
"""

from __future__ import annotations

import base64
import copy
import secrets
from typing import Callable, Sequence

import attrs
import scramp
from scramp.utils import ServerError

from .errors import AccessDenied, LocalProtocolError, RemoteProtocolError, UpstreamError

SCRAM_SHA_1 = "SCRAM-SHA-1"
SCRAM_SHA_256 = "SCRAM-SHA-256"
MECHANISMS = (SCRAM_SHA_1, SCRAM_SHA_256)
TLS_SERVER_END_POINT = "tls-server-end-point"
#: A hostile backend could ask for an absurd PBKDF2 iteration count to pin a CPU.
DEFAULT_MAX_ITERATIONS = 1_000_000
#: Given to scramp in place of the client's user name (see the module docstring).
_PLACEHOLDER_NAME = "-"


# --------------------------------------------------------------------------- client-first parsing


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


def escape_saslname(name: str) -> str:
    """RFC 5802 §5.1: ``=`` → ``=3D``, ``,`` → ``=2C`` (no SASLprep)."""
    return name.replace("=", "=3D").replace(",", "=2C")


@attrs.frozen
class ClientFirst:
    user: str
    nonce: bytes
    bare: bytes = attrs.field(repr=False)
    gs2_header: bytes = attrs.field(repr=False)


def parse_client_first(message: bytes) -> ClientFirst:
    """Read ``n,,n=<user>,r=<nonce>``, the user name verbatim (not SASLprep'd).

    Refused as ``RemoteProtocolError``: channel binding (``p=``; these
    servers do not offer -PLUS), an authorization identity (``a=``, which
    PostgreSQL refuses too), extensions (``m=``), a missing name or nonce.
    """
    message = bytes(message)
    try:
        cbind, _, rest = message.partition(b",")
        authzid, sep, bare = rest.partition(b",")
        if not sep or cbind not in (b"n", b"y"):
            raise ValueError("unsupported or missing GS2 channel-binding flag")
        if authzid:
            raise ValueError("an authorization identity (a=) is not supported")
        if not bare.startswith(b"n="):
            raise ValueError("the user name (n=) must come first")
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


# --------------------------------------------------------------------------- verifiers


@attrs.frozen
class Verifier:
    """What a server stores for one secret and mechanism (never the secret)."""

    mechanism: str
    salt: bytes = attrs.field(repr=False)
    iterations: int
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)


def make_verifier(mechanism: str, password: str, salt: bytes, iterations: int) -> Verifier:
    """StoredKey/ServerKey for ``password`` (what SCRAM hashes, SASLprep'd by scramp; ASCII is unchanged)."""
    try:
        salt, stored_key, server_key, iterations = scramp.ScramMechanism(mechanism).make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
    except scramp.ScramException as exc:
        raise ValueError(f"cannot derive a {mechanism} verifier: {exc}") from None
    return Verifier(mechanism, salt, iterations, stored_key, server_key)


@attrs.frozen
class ScramFlavour:
    """How one protocol turns a secret into the password SCRAM hashes for ``mechanism``.

    ``password(user, secret)`` returns that text.  The token registry keeps
    one verifier per flavour (keyed by ``mechanism``).
    """

    mechanism: str
    password: Callable[[str, str], str]


#: The SCRAM-SHA-256 every protocol here uses: the secret itself (a token is ASCII: its own SASLprep).
PLAIN_SHA_256 = ScramFlavour(SCRAM_SHA_256, lambda user, secret: secret)


# --------------------------------------------------------------------------- client


def _client_failed(detail: str) -> UpstreamError:
    return UpstreamError(f"SCRAM authentication with the backend failed: {detail}",
                         kind="auth", client_hint="backend authentication failed")


def _first_problem(message: str, client_nonce: str) -> str:
    """Which part of a server-first-message scramp refused, in words (error path only, for the log)."""
    parts = message.split(",")
    if any(len(p) < 2 or p[1] != "=" for p in parts):
        return "malformed server-first-message"
    attrs_ = {p[0]: p[2:] for p in reversed(parts)}
    if "m" in attrs_:
        return "server requires an unsupported SCRAM extension"
    if "e" in attrs_:
        return f"server reported {attrs_['e']!r}"
    for key, what in (("r", "nonce"), ("s", "salt"), ("i", "iteration count")):
        if key not in attrs_:
            return f"server-first-message lacks {key!r} (the {what})"
    if not attrs_["r"].startswith(client_nonce) or len(attrs_["r"]) <= len(client_nonce):
        return "server nonce does not extend the client nonce"
    try:
        salt = base64.b64decode(attrs_["s"], validate=True)
    except ValueError:
        return f"malformed salt {attrs_['s'][:16]!r}"
    if len(salt) < 12:
        return f"salt of {len(salt)} bytes is too short"
    if not attrs_["i"].isascii() or not attrs_["i"].isdigit():
        return f"malformed iteration count {attrs_['i'][:16]!r}"
    return f"unacceptable iteration count {attrs_['i'][:16]}"


class ScramClient:
    """The client side of one SCRAM exchange (scramp's ``ScramClient``), sans-IO.  Single use.

    ``password``: the bytes SCRAM hashes, as the protocol prepared them.
    ``channel_binding``: ``tls-server-end-point`` data → the ``-PLUS``
    mechanism; else ``binding_supported`` sends GS2 flag ``y`` (the client
    could bind, the server did not offer -PLUS) instead of ``n``.
    ``nonce`` exists for test vectors (default: 18 random bytes in base64, as
    libpq).  Failures raise ``UpstreamError(kind="auth")``; calls out of
    order ``LocalProtocolError``.
    """

    def __init__(
        self,
        mechanism: str,
        user: str,
        password: bytes,
        *,
        channel_binding: bytes | None = None,
        binding_supported: bool = False,
        nonce: str | bytes | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        if isinstance(nonce, bytes):
            nonce = nonce.decode("ascii")
        self._nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        if channel_binding is not None:
            self.mechanism = mechanism + "-PLUS"
            cb: tuple[str, bytes] | None = (TLS_SERVER_END_POINT, channel_binding)
        else:
            self.mechanism = mechanism
            # scramp sends "y" when it holds binding data but the mechanism has no -PLUS;
            # with "y" the data itself is never sent or hashed.
            cb = (TLS_SERVER_END_POINT, b"-") if binding_supported else None
        self._user = user
        self._max_iterations = max_iterations
        self._state = "start"
        try:
            self._scramp = scramp.ScramClient([self.mechanism], _PLACEHOLDER_NAME, "", channel_binding=cb, c_nonce=self._nonce)
        except scramp.ScramException as exc:
            raise ValueError(f"cannot start SCRAM: {exc}") from None
        self._scramp.password = bytes(password)  # scramp hashes bytes(password): the protocol's own preparation

    def __repr__(self) -> str:
        return f"<ScramClient {self.mechanism} {self._state}>"

    def client_first(self) -> bytes:
        """client-first-message: ``<gs2 header>n=<user>,r=<nonce>``."""
        if self._state != "start":
            raise LocalProtocolError("client_first() called twice")
        self._state = "first-sent"
        placeholder_first = self._scramp.get_client_first()
        gs2_header = placeholder_first[: len(placeholder_first) - len(self._scramp.client_first_bare)]
        bare = f"n={escape_saslname(self._user)},r={self._nonce}"
        self._scramp.client_first_bare = bare  # the AuthMessage starts with what is actually sent
        return (gs2_header + bare).encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """client-final-message ``c=…,r=…,p=…`` for the server's ``r=…,s=…,i=…``."""
        if self._state != "first-sent":
            raise LocalProtocolError("client_final() before client_first() or twice")
        self._state = "final-sent"
        try:
            text = bytes(server_first).decode("ascii")
        except UnicodeDecodeError:
            raise _client_failed("server-first-message is not ASCII") from None
        try:
            self._scramp.set_server_first(text)
        except (scramp.ScramException, ValueError) as exc:
            raise _client_failed(f"{_first_problem(text, self._nonce)}: {exc}") from None
        iterations = int(self._scramp.iterations)
        if iterations > self._max_iterations:
            raise _client_failed(f"unacceptable iteration count {iterations} (at most {self._max_iterations})")
        return self._scramp.get_client_final().encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check ``v=<ServerSignature>``: the server proved it holds the verifier; ``e=`` fails."""
        if self._state != "final-sent":
            raise LocalProtocolError("verify_server_final() before client_final()")
        try:
            text = bytes(server_final).decode("ascii")
        except UnicodeDecodeError:
            raise _client_failed("server-final-message is not ASCII") from None
        # scramp's client ends its exchange even when the check fails; a copy checks, so a
        # refused message leaves the exchange where it was (a client may still be shown the right one).
        attempt = copy.copy(self._scramp)
        try:
            attempt.set_server_final(text)
            self._state = "done"
        except (scramp.ScramException, ValueError) as exc:
            if text.startswith("e="):
                what = "server reported an error"
            elif text.startswith("v=") and getattr(exc, "server_error", None) is not ServerError.INVALID_ENCODING:
                what = "server signature mismatch"
            else:
                what = "malformed server-final-message"
            raise _client_failed(f"{what}: {exc}") from None


# --------------------------------------------------------------------------- server


class ScramFailed(AccessDenied):
    """The client-final-message was well formed but proves nothing.

    ``reason``: ``scram_bad_binding`` (its ``c=`` is not its GS2 header),
    ``scram_bad_nonce`` or ``scram_no_match`` (no candidate accepts the proof).
    """


#: (salt, iteration count, [(StoredKey, ServerKey), ...]) for a user name.
Lookup = Callable[[str], "tuple[bytes, int, Sequence[tuple[bytes, bytes]]]"]


class ScramServer:
    """The server side of one SCRAM exchange against one or more candidate verifiers.  Single use.

    ``lookup(user)`` → (salt, iterations, candidates), called once the
    client-first-message named the user (``user`` overrides that name:
    PostgreSQL takes it from the startup packet).  No candidate → the proof
    fails like a wrong password.  ``matched`` is the index of the candidate
    whose key the proof showed; ``user`` the name used.

        srv = ScramServer("SCRAM-SHA-256", lookup)
        send(srv.server_first(client_first))     # r=…,s=…,i=…
        send(srv.server_final(client_final))     # v=…   (raises ScramFailed / RemoteProtocolError)
    """

    def __init__(self, mechanism: str, lookup: Lookup, *, user: str | None = None, nonce: str | bytes | None = None) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        if isinstance(nonce, bytes):
            nonce = nonce.decode("ascii")
        self.mechanism = mechanism
        self.user = user
        self.matched: int | None = None
        self._lookup = lookup
        self._nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._servers: list = []
        self._expected_nonce = ""

    def server_first(self, client_first: bytes | ClientFirst) -> bytes:
        if self._servers:
            raise LocalProtocolError("server_first() called twice")
        first = client_first if isinstance(client_first, ClientFirst) else parse_client_first(client_first)
        if self.user is None:
            self.user = first.user
        salt, iterations, candidates = self._lookup(self.user)
        if not candidates:
            size = scramp.ScramMechanism(self.mechanism).hf().digest_size
            candidates = [(secrets.token_bytes(size), secrets.token_bytes(size))]
        try:
            bare = first.bare.decode("utf-8")
            gs2_header = first.gs2_header.decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                "malformed SCRAM client-first-message: not UTF-8", client_hint="malformed SCRAM client-first-message"
            ) from None
        # scramp SASLpreps the name and refuses libpq's empty one: it parses a placeholder instead.
        rest = bare[bare.index(","):]
        stand_in = f"{gs2_header}n={_PLACEHOLDER_NAME}{rest}"
        mech = scramp.ScramMechanism(self.mechanism)
        server_first = ""
        try:
            for stored_key, server_key in candidates:
                verifier = (salt, stored_key, server_key, iterations)
                srv = mech.make_server(lambda _name, v=verifier: v, s_nonce=self._nonce)
                srv.set_client_first(stand_in)
                srv.client_first_bare = bare  # the AuthMessage holds what the client signed
                server_first = srv.get_server_first()
                self._servers.append(srv)
        except scramp.ScramException as exc:
            self._servers = []
            raise RemoteProtocolError(
                f"malformed SCRAM client-first-message: {exc}", client_hint="malformed SCRAM client-first-message"
            ) from None
        self._expected_nonce = first.nonce.decode("ascii") + self._nonce
        return server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        if not self._servers:
            raise LocalProtocolError("server_first() must come first")
        if self.matched is not None:
            raise LocalProtocolError("server_final() after a successful exchange")
        try:
            text = bytes(client_final).decode("ascii")
        except UnicodeDecodeError:
            raise _malformed_final("not ASCII") from None
        for index, candidate in enumerate(self._servers):
            # scramp's server ends its exchange at the first client-final; each candidate checks
            # on a copy so the others (and a caller that lets a client retry) are unaffected.
            srv = copy.copy(candidate)
            try:
                srv.set_client_final(text)
            except scramp.ScramException as exc:
                if exc.server_error is ServerError.INVALID_PROOF:
                    continue  # not this candidate's key
                if exc.server_error is ServerError.CHANNEL_BINDINGS_DONT_MATCH:
                    raise ScramFailed("SCRAM channel binding does not match the GS2 header", reason="scram_bad_binding") from None
                nonce = next((p[2:] for p in text.split(",") if p.startswith("r=")), None)
                if nonce is not None and nonce != self._expected_nonce and "p=" in text:
                    raise ScramFailed("SCRAM nonce mismatch", reason="scram_bad_nonce") from None
                raise _malformed_final(str(exc)) from None
            self.matched = index
            return srv.get_server_final().encode("ascii")
        raise ScramFailed(f"no key of {self.user!r} matches the SCRAM proof", reason="scram_no_match")


def _malformed_final(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed SCRAM client-final-message: {detail}",
                               client_hint="malformed SCRAM client-final-message")
