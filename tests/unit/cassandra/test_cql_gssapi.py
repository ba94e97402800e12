"""SASL GSSAPI (RFC 4752) toward Cassandra: the security-layer bytes, the client state machine, the
Cassandra mechanism steps and their config rules — without a KDC.

The layer bytes are checked literally.  The state machine runs over a stand-in security context
whose wrap/unwrap are visible (a marker byte and the conf flag), so every step's output is exact;
the real GSS exchange (MIT on the proxy's side, the JDK's SASL server in Cassandra) is in
tests/integration/test_cassandra_kerberos.py.
"""

from __future__ import annotations

import json

import pytest

from dbproxy import kerberos
from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.engines.cassandra.auth import DSE_AUTHENTICATOR, GssapiAuthenticator, backend_authenticator
from dbproxy.errors import ConfigErrors, UpstreamError
from dbproxy.kerberos import SaslGssapi, SaslLayerError, sasl_gssapi_layer_reply

# --------------------------------------------------------------------------- the layer bytes (RFC 4752 3.1, 3.3)


def test_reply_selects_no_security_layer_size_zero_and_appends_the_authzid():
    # What the JDK's GSSAPI server offers (seen from Cassandra 5.0.9 on JDK 17): no layer, 65536.
    assert sasl_gssapi_layer_reply(b"\x01\x01\x00\x00") == b"\x01\x00\x00\x00"
    # All three layers offered, the client still picks "none"; authzid in UTF-8, no NUL terminator.
    assert sasl_gssapi_layer_reply(b"\x07\x00\x10\x00", "dbproxy") == b"\x01\x00\x00\x00dbproxy"
    assert sasl_gssapi_layer_reply(b"\x01\x00\x00\x00", "rôle") == b"\x01\x00\x00\x00r\xc3\xb4le"


@pytest.mark.parametrize("offer", [b"", b"\x01", b"\x01\x00\x00", b"\x01\x00\x00\x00\x00"])
def test_offer_must_be_four_octets(offer):
    with pytest.raises(SaslLayerError, match=f"is {len(offer)} octets, RFC 4752 3.1 requires 4"):
        sasl_gssapi_layer_reply(offer)


@pytest.mark.parametrize("mask", [0x00, 0x02, 0x04, 0x06])
def test_server_that_requires_a_layer_is_refused(mask):
    with pytest.raises(SaslLayerError, match=f"requires a SASL security layer \\(offer bit-mask {mask:#04x}\\)"):
        sasl_gssapi_layer_reply(bytes((mask, 0, 0x10, 0)))


# --------------------------------------------------------------------------- the exchange


class StandInContext:
    """A GssInitiator-shaped context: two context tokens, then wrap = b"W" + conf flag + data."""

    target = "cassandra@localhost"

    def __init__(self, *, rounds: int = 2) -> None:
        self.rounds = rounds
        self.complete = False
        self.steps: list[bytes | None] = []
        self.wrapped: list[tuple[bytes, bool]] = []

    async def step(self, token):
        self.steps.append(token)
        if len(self.steps) >= self.rounds:
            self.complete = True
            return None  # the AP-REP processed: nothing more to send
        return b"\x60ctx-token-%d" % len(self.steps)

    def unwrap(self, data: bytes) -> bytes:
        if data[:2] != b"W\x00":
            raise RuntimeError("bad MIC")
        return data[2:]

    def wrap(self, data: bytes, confidential: bool = True) -> bytes:
        self.wrapped.append((data, confidential))
        return b"W" + bytes((confidential,)) + data


async def test_exchange_context_then_empty_response_then_wrapped_layer_answer():
    ctx = StandInContext()
    sasl = SaslGssapi(ctx, "dbproxy")
    assert await sasl.initial() == b"\x60ctx-token-1"
    # The server's AP-REP completes the context; no token: RFC 4752 3.1 says answer empty.
    assert await sasl.respond(b"ap-rep") == b""
    assert ctx.steps == [None, b"ap-rep"] and not sasl.done
    answer = await sasl.respond(b"W\x00\x01\x01\x00\x00")
    assert answer == b"W\x00" + b"\x01\x00\x00\x00dbproxy"
    assert ctx.wrapped == [(b"\x01\x00\x00\x00dbproxy", False)]  # conf_flag FALSE
    assert sasl.done
    with pytest.raises(UpstreamError, match="another challenge after the SASL GSSAPI exchange had ended"):
        await sasl.respond(b"W\x00\x01\x00\x00\x00")


async def test_offer_not_wrapped_under_the_context_is_an_auth_failure():
    ctx = StandInContext(rounds=1)
    sasl = SaslGssapi(ctx)
    await sasl.initial()
    with pytest.raises(UpstreamError) as info:
        await sasl.respond(b"forged offer")
    assert info.value.kind == "auth" and "failed GSS_Unwrap" in str(info.value)
    assert info.value.client_hint == kerberos.CLIENT_HINT and not sasl.done


async def test_empty_challenge_after_completion_and_bad_offer_are_refused():
    sasl = SaslGssapi(StandInContext(rounds=1))
    await sasl.initial()
    with pytest.raises(UpstreamError, match="empty challenge where RFC 4752 3.1 expects"):
        await sasl.respond(b"")
    with pytest.raises(UpstreamError, match="requires a SASL security layer"):
        await sasl.respond(b"W\x00\x04\x00\x10\x00")


# --------------------------------------------------------------------------- the Cassandra mechanism steps


class StandInCredential:
    name = "dbproxy@DBPROXY.TEST"

    async def get(self):
        return self


class StandInCache:
    def __init__(self) -> None:
        self.params: list[dict] = []

    def for_auth(self, params):
        self.params.append(params)
        return StandInCredential()


def _route(tmp_path, **auth):
    keytab = tmp_path / "kt"
    keytab.write_bytes(b"\x05\x02")
    a = {"method": "gssapi", "principal": "dbproxy@R", "keytab_file": str(keytab), **auth}
    doc = {"listeners": [{"name": "c", "protocol": "cassandra", "listen": "127.0.0.1:0",
                          "routes": [{"backend": {"address": "127.0.0.1:9042", "auth": a}}]}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    return load_config(str(path), default_registry()).listeners[0].routes[0]


@pytest.fixture
def contexts(monkeypatch):
    made: list = []

    def factory(creds, service, host, **kw):
        ctx = StandInContext()
        ctx.target, ctx.args = f"{service}@{host}", (creds, service, host, kw)
        made.append(ctx)
        return ctx

    monkeypatch.setattr(kerberos, "GssInitiator", factory)
    return made


async def test_gssapi_route_first_token_at_once_then_layer_exchange(tmp_path, contexts):
    route = _route(tmp_path, host="localhost")
    auth = backend_authenticator(route, StandInCache())
    assert isinstance(auth, GssapiAuthenticator) and auth.mechanism == "GSSAPI"
    assert await auth.initial_response("com.instaclustr.cassandra.auth.KerberosAuthenticator") == b"\x60ctx-token-1"
    (ctx,) = contexts
    assert ctx.args[1:] == ("cassandra", "localhost", {"mutual": True, "integrity": True})
    assert auth.principal == "dbproxy@DBPROXY.TEST"
    assert await auth.evaluate_challenge(b"ap-rep") == b""
    with pytest.raises(UpstreamError, match="AUTH_SUCCESS before the SASL GSSAPI exchange completed"):
        auth.on_success(None)  # the server has not proven itself yet
    assert await auth.evaluate_challenge(b"W\x00\x01\x01\x00\x00") == b"W\x00\x01\x00\x00\x00"
    auth.on_success(None)


async def test_dse_negotiates_the_mechanism_first(tmp_path, contexts):
    route = _route(tmp_path, service="dse", host="db1.example", authorization_id="reporting")
    auth = backend_authenticator(route, StandInCache())
    assert await auth.initial_response(DSE_AUTHENTICATOR) == b"GSSAPI"
    assert contexts == []  # no ticket fetched before the server agreed to GSSAPI
    assert await auth.evaluate_challenge(b"GSSAPI-START") == b"\x60ctx-token-1"
    assert contexts[0].target == "dse@db1.example"
    await auth.evaluate_challenge(b"ap-rep")
    assert await auth.evaluate_challenge(b"W\x00\x01\x00\x00\x00") == b"W\x00\x01\x00\x00\x00reporting"


async def test_dse_without_gssapi_start_and_password_only_node_are_refused(tmp_path, contexts):
    auth = backend_authenticator(_route(tmp_path), StandInCache())
    await auth.initial_response(DSE_AUTHENTICATOR)
    with pytest.raises(UpstreamError, match="not GSSAPI-START"):
        await auth.evaluate_challenge(b"PLAIN-START")
    auth = backend_authenticator(_route(tmp_path), StandInCache())
    with pytest.raises(UpstreamError) as info:
        await auth.initial_response("org.apache.cassandra.auth.PasswordAuthenticator")
    assert "SASL PLAIN only" in str(info.value) and info.value.client_hint == "the backend database does not offer Kerberos authentication"
    assert contexts == []


async def test_no_credential_cache_is_an_auth_error(tmp_path, contexts):
    auth = backend_authenticator(_route(tmp_path), None)
    with pytest.raises(UpstreamError, match="no Kerberos credential cache"):
        await auth.initial_response("x")


# --------------------------------------------------------------------------- config


def _errors(tmp_path, **auth) -> str:
    with pytest.raises(ConfigErrors) as info:
        _route(tmp_path, **auth)
    return str(info.value)


def test_gssapi_config(tmp_path):
    route = _route(tmp_path, service="cassandra", host="localhost", krb5_config=str(tmp_path / "kt"),
                   renew_margin_seconds=60, authorization_id="app")
    assert route.backend.auth.method == "gssapi"
    assert route.backend.auth.params["authorization_id"] == "app" and route.backend.auth.params["host"] == "localhost"
    assert "auth.gssencmode: expected a gssapi key" in _errors(tmp_path, gssencmode="require")
    assert "expected no password for method gssapi" in _errors(tmp_path, password_file=str(tmp_path / "kt"))
    assert "authorization_id: expected a non-empty string" in _errors(tmp_path, authorization_id="")
    assert "only one of \"keytab_file\" or \"ccache\"" in _errors(tmp_path, ccache="FILE:/tmp/x")
