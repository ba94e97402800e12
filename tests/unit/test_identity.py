"""Tokens, the SCRAM verifier registry and mTLS identities (dbproxy.identity), without a network.

SCRAM conversations run the proxy's ScramTokenServer against the project's
own SCRAM *clients* (the Postgres engine's and the Mongo engine's), so a
verifier that a real client could not satisfy fails here.
"""

from __future__ import annotations

import base64
import json
import os
import time

import orjson
import pytest

from dbproxy.errors import AuthFailed
from dbproxy.identity.authenticator import ClientAuthenticator
from dbproxy.identity.authority import TokenAuthority
from dbproxy.identity.config import MtlsConfig, TokenConfig
from dbproxy.identity.keys import TokenKeys, b64url, generate_keys
from dbproxy.identity.mtls import certificate_subject
from dbproxy.identity.tokens import TokenCodec, parse_ttl
from dbproxy.scram import SCRAM_SHA_1, SCRAM_SHA_256

NOW = 1_800_000_000


@pytest.fixture(params=["EdDSA", "HS256"])
def cfg(request, tmp_path) -> TokenConfig:
    alg = request.param
    key = tmp_path / "token.key"
    pub = tmp_path / "token.pub"
    generate_keys(alg, str(key), str(pub) if alg == "EdDSA" else None)
    return TokenConfig(
        algorithm=alg,
        key_file=str(key),
        public_key_file=str(pub) if alg == "EdDSA" else None,
        registry_file=str(tmp_path / "tokens.json"),
        revocation_file=str(tmp_path / "revoked.txt"),
        leeway=0,
    )


def issue(authority: TokenAuthority, user="alice", roles=("analyst",), ttl=3600, now=None) -> tuple[str, object]:
    token, claims = authority.codec.issue(user, roles, ttl, now=now)
    authority.registry.add(claims, token, now=now)
    return token, claims


def _segments(token: str) -> list[dict | bytes]:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return [json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p))), base64.urlsafe_b64decode(pad(s))]


# --------------------------------------------------------------------------- tokens


def test_sign_and_verify(cfg):
    a = TokenAuthority(cfg)
    token, claims = a.codec.issue("alice", ["analyst", "writer"], 600)
    header, payload, sig = _segments(token)
    assert header == {"alg": cfg.algorithm, "kid": a.keys.key_id, "typ": "JWT"}
    assert payload["sub"] == "alice" and payload["roles"] == ["analyst", "writer"]
    assert payload["exp"] - payload["iat"] == 600 and payload["jti"] == claims.jti and payload["iss"] == "dbproxy"
    assert len(sig) == (64 if cfg.algorithm == "EdDSA" else 32)
    ident = a.verify_password("alice", token)
    assert (ident.user, ident.roles, ident.method, ident.token_id) == ("alice", ("analyst", "writer"), "token", claims.jti)
    assert a.verify_password("alice", token.encode()).user == "alice"  # PasswordMessage bytes


def test_expiry_and_not_before(cfg):
    a = TokenAuthority(cfg)
    token, claims = a.codec.issue("alice", [], 60, now=NOW)
    assert a.verify_password("alice", token, now=NOW + 59).user == "alice"
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token, now=NOW + 60)
    assert info.value.reason == "token_expired" and info.value.token_id == claims.jti
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token, now=NOW - 5)
    assert info.value.reason == "token_not_yet_valid"


def test_leeway_allows_small_clock_skew(cfg):
    codec = TokenCodec(TokenKeys.from_config(cfg), leeway=30)
    token, _ = codec.issue("alice", [], 60, now=NOW)
    codec.check_time(codec.decode(token), NOW + 89)
    with pytest.raises(AuthFailed):
        codec.check_time(codec.decode(token), NOW + 90)


def _resign_payload(token: str, **changes) -> str:
    h, p, s = token.split(".")
    payload = _segments(token)[1]
    payload.update(changes)
    return f"{h}.{b64url(orjson.dumps(payload))}.{s}"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda t: _resign_payload(t, roles=["admin"]), id="roles"),
        pytest.param(lambda t: _resign_payload(t, sub="mallory"), id="sub"),
        pytest.param(lambda t: _resign_payload(t, exp=4_000_000_000), id="exp"),
        pytest.param(lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), id="signature"),
        pytest.param(lambda t: b64url(b'{"alg":"none","typ":"JWT"}') + "." + t.split(".")[1] + ".", id="alg-none"),
    ],
)
def test_tampered_tokens_refused(cfg, tamper):
    a = TokenAuthority(cfg)
    token, _ = a.codec.issue("alice", ["analyst"], 600)
    with pytest.raises(AuthFailed) as info:
        a.verify_password(None, tamper(token))
    assert info.value.reason == "token_bad_signature"


def _forge(header: dict, payload: dict, secret: bytes | None) -> str:
    """A token built by hand, as an attacker would (HMAC-SHA256 with ``secret``, or unsigned)."""
    import hmac

    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    signature = hmac.digest(secret, signing_input.encode(), "sha256") if secret is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def _sign_with_key_file(cfg: TokenConfig, header: dict, payload: dict) -> str:
    """A token signed with the configured key itself (the holder of the key, or a bug, wrote the header)."""
    from cryptography.hazmat.primitives import serialization

    key = open(cfg.key_file, "rb").read()
    if cfg.algorithm == "HS256":
        return _forge(header, payload, key.strip())
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    signature = serialization.load_pem_private_key(key, None).sign(signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def _claims(user="alice", roles=("admin",), ttl=600) -> dict:
    now = int(time.time())
    return {"iss": "dbproxy", "sub": user, "roles": list(roles), "iat": now, "exp": now + ttl, "jti": "forged"}


def test_algorithm_confusion_refused(tmp_path):
    # An HS256 token "signed" with the Ed25519 public key bytes must not verify against the EdDSA key.
    generate_keys("EdDSA", str(tmp_path / "k"), str(tmp_path / "k.pub"))
    cfg = TokenConfig("EdDSA", str(tmp_path / "k"), str(tmp_path / "k.pub"), None, None)
    a = TokenAuthority(cfg)
    pub_pem = (tmp_path / "k.pub").read_bytes()
    from cryptography.hazmat.primitives import serialization

    pub_raw = serialization.load_pem_public_key(pub_pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for secret in (pub_pem, pub_raw):
        forged = _forge({"alg": "HS256", "kid": a.keys.key_id, "typ": "JWT"}, _claims(), secret)
        with pytest.raises(AuthFailed) as info:
            a.verify_password("alice", forged)
        assert info.value.reason == "token_bad_signature"
    # The confusion cannot even be set up: a public key is refused as an HS256 secret.
    with pytest.raises(ValueError):
        TokenKeys("HS256", secret=pub_pem)


def test_unsigned_and_mislabelled_tokens_refused(cfg):
    """alg "none" (with or without a signature), another algorithm in the header, a kid of another key."""
    a = TokenAuthority(cfg)
    kid = a.keys.key_id
    other = "HS256" if cfg.algorithm == "EdDSA" else "EdDSA"
    secret = open(cfg.key_file, "rb").read().strip() if cfg.algorithm == "HS256" else b"x" * 32
    for header, key in (
        ({"alg": "none", "kid": kid, "typ": "JWT"}, None),
        ({"alg": "None", "kid": kid, "typ": "JWT"}, None),
        ({"alg": "none", "kid": kid, "typ": "JWT"}, secret),
        ({"alg": other, "kid": kid, "typ": "JWT"}, secret),
        ({"kid": kid, "typ": "JWT"}, secret),
    ):
        with pytest.raises(AuthFailed) as info:
            a.verify_password("alice", _forge(header, _claims(), key))
        assert info.value.reason == "token_bad_signature", header
    # Correctly signed with this key, but the header's kid names another key.
    token = _sign_with_key_file(cfg, {"alg": cfg.algorithm, "kid": "0123456789abcdef", "typ": "JWT"}, _claims(roles=()))
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token)
    assert info.value.reason == "token_bad_signature" and "key id" in str(info.value)
    # The same claims with this key's kid are accepted: the refusal above is the kid's.
    token = _sign_with_key_file(cfg, {"alg": cfg.algorithm, "kid": kid, "typ": "JWT"}, _claims(roles=()))
    assert a.verify_password("alice", token).token_id == "forged"


# Recorded from the hand-written JWS/SCRAM code this module had before PyJWT and scramp.
_OLD_HS256 = (
    "eyJhbGciOiJIUzI1NiIsImtpZCI6IjJlYTE4MDU0Mzk3NjBmNDkiLCJ0eXAiOiJKV1QifQ."
    "eyJleHAiOjE4MDAwMDA2MDAsImlhdCI6MTgwMDAwMDAwMCwiaXNzIjoiZGJwcm94eSIsImp0aSI6ImoxIiwicm9sZXMiOlsiYW5hbHlzdCJdLCJzdWIiOiJhbGljZSJ9."
    "sVUXDngLd9hXf8yZsaEFGbFgqcenYDdu6zIPvH5Ok34"
)
_OLD_EDDSA = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6IjM0NzUwZjk4YmQ1OWZjZmMiLCJ0eXAiOiJKV1QifQ."
    "eyJleHAiOjE4MDAwMDA2MDAsImlhdCI6MTgwMDAwMDAwMCwiaXNzIjoiZGJwcm94eSIsImp0aSI6ImoxIiwicm9sZXMiOlsiYW5hbHlzdCJdLCJzdWIiOiJhbGljZSJ9."
    "_Sai-xPP3DEZi1ceIMnr5QuhpQM0HVHZJ6H2F3X3o-QZte8C7G_OqycMl3rOM9cNmGGd9UhQac8IFF5hilAbCw"
)


def test_tokens_verifiers_and_registry_signatures_unchanged():
    """Tokens, SCRAM verifiers and registry signatures are the bytes the hand-written code produced,
    so tokens and registry files issued before the switch to PyJWT/scramp stay valid."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dbproxy.identity.registry import RegistryEntry, scram_verifier
    from dbproxy.scram import PLAIN_SHA_256
    from dbproxy.engines.mongo.scram import MONGO_SHA_1

    hs = TokenKeys("HS256", secret=b"k" * 32)
    ed = TokenKeys("EdDSA", private_key=Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
    token, claims = TokenCodec(hs).issue("alice", ["analyst"], 600, now=NOW, jti="j1")
    assert token == _OLD_HS256
    assert TokenCodec(ed).issue("alice", ["analyst"], 600, now=NOW, jti="j1")[0] == _OLD_EDDSA
    assert TokenCodec(ed).decode(_OLD_EDDSA) == TokenCodec(hs).decode(_OLD_HS256) == claims
    verifiers = {f.mechanism: scram_verifier(f, "alice", token, b"s" * 16, 4096) for f in (PLAIN_SHA_256, MONGO_SHA_1)}
    entry = RegistryEntry(claims, verifiers, b"")
    assert entry.to_json()["scram"][SCRAM_SHA_256] == {
        "salt": "c3Nzc3Nzc3Nzc3Nzc3Nzcw", "i": 4096,
        "stored_key": "-UKVU4yz4xT6vtLwQphhYETP9WKf8xqfbt09btbsnsw", "server_key": "zYP7CXf7firKk-0dIojePxj8RFukz3vEf_zWcqDxHuc",
    }
    assert entry.to_json()["scram"][SCRAM_SHA_1] == {
        "salt": "c3Nzc3Nzc3Nzc3Nzc3Nzcw", "i": 4096,
        "stored_key": "hLHNsmP-eDeroqyV6miKAXB2Two", "server_key": "h9vbWjB2gJAf4d8n2toPXBfcciM",
    }
    assert b64url(hs.sign(entry.signed_bytes())) == "HM2E4eCNfV4RNSDl5-tufRgIc-PGSkP-ZpDM5hqfVC4"
    assert b64url(ed.sign(entry.signed_bytes())) == (
        "vxRlF3IkSMjO9tM7uUUMM_xvSQhSubUnLlZlPKqRPi9OqmlfOQbcHaymreitCxCW3dW8iv_mY2WiA7CKrzP0Dg"
    )


def test_core_records_no_protocol_digest_engines_declare_theirs(cfg):
    """Without engine flavours the registry holds the plain SCRAM-SHA-256 verifier only; `token issue`
    adds the flavours the registered engines declare (Mongo's SCRAM-SHA-1 digest)."""
    from dbproxy.token_cli import scram_flavours
    from dbproxy.engines.mongo.scram import MONGO_SHA_1

    a = TokenAuthority(cfg)
    token, claims = issue(a)
    assert set(a.registry.entries()[claims.jti].scram) == {SCRAM_SHA_256}
    assert MONGO_SHA_1 in scram_flavours()
    b = TokenAuthority(cfg, flavours=scram_flavours())
    _, claims = issue(b)
    assert set(b.registry.entries()[claims.jti].scram) == {SCRAM_SHA_256, SCRAM_SHA_1}


def test_not_before_claim(cfg):
    a = TokenAuthority(cfg)
    claims = {**_claims(), "iat": NOW, "exp": NOW + 600, "nbf": NOW + 100}
    token = _sign_with_key_file(cfg, {"alg": cfg.algorithm, "kid": a.keys.key_id, "typ": "JWT"}, claims)
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token, now=NOW + 50)
    assert info.value.reason == "token_not_yet_valid"
    assert a.verify_password("alice", token, now=NOW + 100).user == "alice"


def test_token_from_another_key_refused(cfg, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    generate_keys(cfg.algorithm, str(other_dir / "k"), str(other_dir / "p") if cfg.algorithm == "EdDSA" else None)
    other = TokenAuthority(TokenConfig(cfg.algorithm, str(other_dir / "k"), str(other_dir / "p") if cfg.algorithm == "EdDSA" else None, None, None))
    token, _ = other.codec.issue("alice", [], 600)
    with pytest.raises(AuthFailed) as info:
        TokenAuthority(cfg).verify_password("alice", token)
    assert info.value.reason == "token_bad_signature"


def test_wrong_user_refused(cfg):
    a = TokenAuthority(cfg)
    token, claims = a.codec.issue("bob", [], 600)
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token)
    assert info.value.reason == "token_wrong_user" and info.value.token_id == claims.jti
    assert a.verify_password(None, token).user == "bob"  # protocols without a separate user name


@pytest.mark.parametrize("password", ["", "hunter2", "a.b.c", "x" * 5000, "é.é.é", "e30.e30.", b"\xff\xfe.a.b"])
def test_malformed_passwords_refused(cfg, password):
    with pytest.raises(AuthFailed) as info:
        TokenAuthority(cfg).verify_password("alice", password)
    assert info.value.reason in ("token_malformed", "token_bad_signature")
    assert "hunter2" not in str(info.value)


def test_revocation_file_reread_on_change(cfg):
    a = TokenAuthority(cfg)
    token, claims = a.codec.issue("alice", [], 600)
    other, other_claims = a.codec.issue("alice", [], 600)
    assert a.verify_password("alice", token)
    with open(cfg.revocation_file, "w") as f:
        f.write(f"# revoked by ops\n{claims.jti}  # leaked\n")
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token)
    assert info.value.reason == "token_revoked"
    assert a.verify_password("alice", other).token_id == other_claims.jti
    os.unlink(cfg.revocation_file)  # a removed list revokes nothing
    assert a.verify_password("alice", token)


def test_unreadable_revocation_list_fails_closed(cfg, tmp_path):
    bad = tmp_path / "revdir"
    bad.mkdir()  # a directory: open() fails
    a = TokenAuthority(TokenConfig(**{**attrs_dict(cfg), "revocation_file": str(bad)}))
    token, _ = a.codec.issue("alice", [], 600)
    with pytest.raises(AuthFailed) as info:
        a.verify_password("alice", token)
    assert info.value.reason == "revocation_list_unreadable"


def attrs_dict(obj) -> dict:
    import attrs

    return attrs.asdict(obj)


def test_parse_ttl():
    assert [parse_ttl(x) for x in ("90", "90s", "30m", "8h", "1d", "2w")] == [90, 90, 1800, 28800, 86400, 1209600]
    for bad in ("", "0", "-1h", "8x", "h"):
        with pytest.raises(ValueError):
            parse_ttl(bad)


def test_hmac_key_too_short():
    with pytest.raises(ValueError):
        TokenKeys("HS256", secret=b"short")


# --------------------------------------------------------------------------- SCRAM


def pg_scram_login(authority: TokenAuthority, user: str, password: str):
    """A full PostgreSQL-flavoured exchange: the engine's SCRAM client vs the token server."""
    from dbproxy.engines.postgres.auth import ScramClient

    client = ScramClient(password)  # libpq sends an empty n=; the server uses the startup user
    server = authority.scram_server(user, SCRAM_SHA_256)
    server_first = server.server_first(client.client_first())
    final = server.server_final(client.client_final(server_first))
    client.verify_server_final(final)  # the client accepts the proxy's ServerSignature
    return server.identity


def test_scram_matches_the_token_used_among_several(cfg):
    a = TokenAuthority(cfg)
    t1, c1 = issue(a, roles=("analyst",))
    t2, c2 = issue(a, roles=("writer",))
    t3, c3 = issue(a, user="bob")
    assert pg_scram_login(a, "alice", t1).token_id == c1.jti
    ident = pg_scram_login(a, "alice", t2)
    assert (ident.token_id, ident.roles, ident.method) == (c2.jti, ("writer",), "token")
    assert pg_scram_login(a, "bob", t3).token_id == c3.jti
    # One salt per user and mechanism: the server must send it before the proof names a token.
    regs = a.registry.for_user("alice")
    assert len({e.scram[SCRAM_SHA_256].salt for e in regs}) == 1
    assert regs[0].scram[SCRAM_SHA_256].salt != a.registry.for_user("bob")[0].scram[SCRAM_SHA_256].salt


@pytest.mark.parametrize("case", ["other-user", "unknown-user", "not-issued", "revoked", "expired"])
def test_scram_refusals(cfg, case):
    from dbproxy.errors import UpstreamError

    a = TokenAuthority(cfg)
    token, claims = issue(a)
    bobs, _ = issue(a, user="bob")
    user, password = "alice", token
    if case == "other-user":
        password = bobs
    elif case == "unknown-user":
        user = "zed"
    elif case == "not-issued":
        password, _ = a.codec.issue("alice", [], 600)  # valid token, but never recorded in the registry
    elif case == "revoked":
        with open(cfg.revocation_file, "a") as f:
            f.write(claims.jti + "\n")
    elif case == "expired":
        a2 = TokenAuthority(cfg, a.keys)
        password, c = a2.codec.issue("alice", [], 1, now=time.time() - 10)
        a2.registry.add(c, password, now=time.time() - 10)
    with pytest.raises((AuthFailed, UpstreamError)) as info:
        pg_scram_login(a, user, password)
    assert isinstance(info.value, AuthFailed) and info.value.reason == "scram_no_match"


def test_scram_unknown_user_gets_a_stable_mock_salt(cfg):
    a = TokenAuthority(cfg)
    s1 = a.scram_candidates("nobody", SCRAM_SHA_256)
    s2 = a.scram_candidates("nobody", SCRAM_SHA_256)
    assert s1[0] == s2[0] and len(s1[0]) == 16 and s1[2] == []
    assert a.scram_candidates("other", SCRAM_SHA_256)[0] != s1[0]


def test_registry_entries_are_signed(cfg):
    a = TokenAuthority(cfg)
    token, claims = issue(a, roles=("analyst",))
    doc = json.loads(open(cfg.registry_file).read())
    doc["tokens"][claims.jti]["roles"] = ["admin"]  # someone who can write the file but lacks the key
    with open(cfg.registry_file, "w") as f:
        f.write(json.dumps(doc) + "\n\n")
    assert a.registry.entries() == {}
    with pytest.raises(AuthFailed):
        pg_scram_login(a, "alice", token)


def test_registry_never_holds_the_token_and_is_private(cfg):
    a = TokenAuthority(cfg)
    token, _ = issue(a)
    text = open(cfg.registry_file).read()
    assert token not in text and token.split(".")[2] not in text
    assert os.stat(cfg.registry_file).st_mode & 0o077 == 0


def test_registry_prunes_expired_entries_and_remove(cfg):
    a = TokenAuthority(cfg)
    _, old = issue(a, ttl=1, now=time.time() - 100)
    _, new = issue(a)
    assert set(a.registry.entries()) == {new.jti}
    assert a.registry.remove(new.jti) and a.registry.entries() == {}
    assert not a.registry.remove(new.jti)


def test_mongo_scram_flavours_use_the_same_registry(cfg):
    """Phase 2 readiness: Mongo's SCRAM-SHA-256 (user in n=) and SCRAM-SHA-1 (md5 password digest)."""
    from dbproxy.token_cli import scram_flavours
    from dbproxy.engines.mongo.scram import ScramClient

    a = TokenAuthority(cfg, flavours=scram_flavours())  # as `dbproxy token issue` builds it
    token, claims = issue(a)
    for mechanism in (SCRAM_SHA_256, SCRAM_SHA_1):
        client = ScramClient(mechanism, "alice", token)
        server = a.scram_server(None, mechanism)  # the user comes from the client-first message
        final = server.server_final(client.client_final(server.server_first(client.client_first())))
        client.verify_server_final(final)
        assert server.identity.token_id == claims.jti and server.user == "alice"
        client = ScramClient(mechanism, "alice", "wrong-" + token)
        server = a.scram_server(None, mechanism)
        with pytest.raises(AuthFailed):
            server.server_final(client.client_final(server.server_first(client.client_first())))


def test_scram_rejects_channel_binding_it_did_not_offer(cfg):
    from dbproxy.errors import RemoteProtocolError

    a = TokenAuthority(cfg)
    issue(a)
    server = a.scram_server("alice")
    with pytest.raises(RemoteProtocolError):
        server.server_first(b"p=tls-server-end-point,,n=,r=abc")


def test_scram_needs_a_registry(cfg):
    a = TokenAuthority(TokenConfig(**{**attrs_dict(cfg), "registry_file": None}))
    with pytest.raises(AuthFailed) as info:
        a.scram_server("alice")
    assert info.value.reason == "method_unavailable"


# --------------------------------------------------------------------------- mTLS


CERT = {
    "subject": ((("countryName", "XX"),), (("commonName", "alice"),)),
    "subjectAltName": (("DNS", "alice.example"), ("URI", "spiffe://corp/team-a/alice")),
}


def test_certificate_subject():
    assert certificate_subject(CERT, "cn") == "alice"
    assert certificate_subject(CERT, "san_uri") == "spiffe://corp/team-a/alice"
    assert certificate_subject({"subject": ()}, "cn") is None
    assert certificate_subject(None) is None and certificate_subject({}) is None


def test_mtls_roles_from_config():
    m = MtlsConfig(subject="san_uri", users=(("spiffe://corp/team-a/*", ("analyst",)), ("spiffe://corp/*", ("reader", "analyst"))))
    assert m.roles_for("spiffe://corp/team-a/alice") == ("analyst", "reader")
    assert m.roles_for("spiffe://other/x") == ()

    class FakeTLS:
        def __init__(self, cert):
            self.cert = cert

        def getpeercert(self):
            return self.cert

    auth = ClientAuthenticator(("mtls",), authority=None, mtls=m)
    ident = auth.certificate_identity(FakeTLS(CERT))
    assert (ident.user, ident.roles, ident.method, ident.token_id) == ("spiffe://corp/team-a/alice", ("analyst", "reader"), "mtls", None)
    assert auth.certificate_identity(FakeTLS(None)) is None  # no certificate presented
    assert auth.certificate_identity(object()) is None  # not TLS at all
    with pytest.raises(AuthFailed) as info:
        auth.certificate_identity(FakeTLS({"subject": ((("commonName", "x"),),)}))
    assert info.value.reason == "certificate_no_subject"
    with pytest.raises(AuthFailed):
        auth.verify_token("alice", "x.y.z")  # token is not a method of this listener
