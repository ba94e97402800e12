"""Client-side auth math: RFC 7677's SCRAM vector, replays of real libpq exchanges, MD5, channel binding."""

from __future__ import annotations

import base64
import datetime
import hashlib
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from dbproxy.errors import LocalProtocolError, UpstreamError
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.auth import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramClient,
    md5_password,
    normalize_password,
    tls_server_end_point,
)
from dbproxy.engines.postgres.codec import BackendDecoder, FrontendDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_throwaway import MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "postgres"

# RFC 7677 §3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_client() -> ScramClient:
    return ScramClient("pencil", username="user", nonce=RFC_NONCE)


def test_scram_rfc7677_vector() -> None:
    c = rfc_client()
    assert c.mechanism == SCRAM_SHA_256
    assert c.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert c.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    c.verify_server_final(RFC_SERVER_FINAL)


def test_scram_rejects_wrong_server_signature() -> None:
    c = rfc_client()
    c.client_first()
    c.client_final(RFC_SERVER_FIRST)
    bad = b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(UpstreamError) as ei:
        c.verify_server_final(bad)
    assert ei.value.kind == "auth" and "mismatch" in str(ei.value)


def test_scram_server_error_attribute() -> None:
    c = rfc_client()
    c.client_first()
    c.client_final(RFC_SERVER_FIRST)
    with pytest.raises(UpstreamError, match="invalid-proof"):
        c.verify_server_final(b"e=invalid-proof")


@pytest.mark.parametrize("server_first,what", [
    (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),  # not extended
    (b"m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "extension"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,i=4096", "'s'"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096", "salt"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999", "iteration"),
    (b"garbage", "malformed"),
    (b"r=\xff", "ASCII"),
])
def test_scram_rejects_bad_server_first(server_first: bytes, what: str) -> None:
    c = rfc_client()
    c.client_first()
    with pytest.raises(UpstreamError, match=what):
        c.client_final(server_first)


def test_scram_call_order() -> None:
    c = rfc_client()
    with pytest.raises(LocalProtocolError):
        c.client_final(RFC_SERVER_FIRST)
    c.client_first()
    with pytest.raises(LocalProtocolError):
        c.client_first()
    with pytest.raises(LocalProtocolError):
        c.verify_server_final(RFC_SERVER_FINAL)


def test_scram_plus_channel_binding_attribute() -> None:
    cb = hashlib.sha256(b"certificate").digest()
    c = ScramClient("pencil", cb, nonce=RFC_NONCE)
    assert c.mechanism == SCRAM_SHA_256_PLUS
    assert c.client_first() == b"p=tls-server-end-point,,n=,r=" + RFC_NONCE.encode()
    final = c.client_final(RFC_SERVER_FIRST)
    c_attr = final.split(b",")[0]
    assert base64.b64decode(c_attr[2:]) == b"p=tls-server-end-point,," + cb
    # y flag: client could bind, server did not offer -PLUS
    y = ScramClient("pencil", binding_supported=True, nonce=RFC_NONCE)
    assert y.mechanism == SCRAM_SHA_256 and y.client_first().startswith(b"y,,")
    assert y.client_final(RFC_SERVER_FIRST).startswith(b"c=" + base64.b64encode(b"y,,") + b",")


def test_scram_username_escaping_and_random_nonce() -> None:
    c = ScramClient("x", username="a,b=c")
    first = c.client_first()
    assert first.startswith(b"n,,n=a=2Cb=3Dc,r=")
    nonce = first.split(b",r=")[1]
    assert len(nonce) == 24 and nonce != ScramClient("x").client_first().split(b",r=")[1]


def _stream(name: str, side: str) -> list:
    dec = FrontendDecoder() if side == "fe" else BackendDecoder()
    dec.feed((DATA / f"{name}.{side}.bin").read_bytes())
    out = []
    while True:
        msg = dec.next_message()
        if not hasattr(msg, "raw"):
            return out
        out.append(msg)


@pytest.mark.parametrize("name", ["psql_simple", "psycopg_extended", "psycopg_proto32"])
def test_scram_replays_real_libpq_exchange(name: str) -> None:
    """Recompute libpq's client-final from a captured exchange: same proof, server signature verifies.

    The password is non-ASCII with characters SASLprep maps away, so this also
    checks normalize_password against libpq (15 for psql, 18 for psycopg) and
    the server that stored the verifier.
    """
    fe, be = _stream(name, "fe"), _stream(name, "be")
    init = m.parse_sasl_initial_response(fe[1])
    client_final = m.parse_sasl_response(fe[2])
    auths = [m.parse_authentication(x) for x in be if x.type == m.BE.AUTHENTICATION]
    server_first, server_final = auths[1].data, auths[2].data
    nonce = init.data.split(b",r=")[1].decode()
    c = ScramClient(SCRAM_PASSWORD, nonce=nonce)
    assert c.client_first() == init.data
    assert c.client_final(server_first) == client_final
    c.verify_server_final(server_final)


def test_scram_replay_wrong_password_fails() -> None:
    fe, be = _stream("psql_simple", "fe"), _stream("psql_simple", "be")
    init = m.parse_sasl_initial_response(fe[1])
    auths = [m.parse_authentication(x) for x in be if x.type == m.BE.AUTHENTICATION]
    c = ScramClient("pässwörd", nonce=init.data.split(b",r=")[1].decode())
    c.client_first()
    assert c.client_final(auths[1].data) != m.parse_sasl_response(fe[2])
    with pytest.raises(UpstreamError):
        c.verify_server_final(auths[2].data)


def test_md5_known_value() -> None:
    # "md5" + md5("postgres" + "postgres") is PostgreSQL's well-known stored hash for postgres/postgres.
    salt = b"\x01\x02\x03\x04"
    expected = b"md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest().encode()
    assert md5_password("postgres", "postgres", salt) == expected
    assert md5_password(b"postgres", b"postgres", salt) == expected


def test_md5_replays_real_exchange() -> None:
    fe, be = _stream("psycopg_md5", "fe"), _stream("psycopg_md5", "be")
    salt = m.parse_authentication(be[0]).data
    assert md5_password(MD5_USER, MD5_PASSWORD, salt) == m.parse_password(fe[1])
    assert m.encode_password(md5_password(MD5_USER, MD5_PASSWORD, salt)) == fe[1].raw


@pytest.mark.parametrize("pw,expected", [
    ("plain ascii\x07", b"plain ascii\x07"),                       # ASCII is used as is
    ("I\u00adX", b"IX"),                                            # RFC 4013 §3 examples
    ("\u00aa", b"a"),
    ("\u2168", b"IX"),
    ("p\u00e4ss\u00adw\u2003rd-\u00fc", "p\u00e4ssw rd-\u00fc".encode()),
    ("\u00e9\u0007", "\u00e9\u0007".encode()),                      # prohibited: raw bytes
    ("\u0627\u0031", "\u0627\u0031".encode()),                      # bidi violation: raw bytes
    (b"\xff\xfe", b"\xff\xfe"),                                     # not UTF-8: raw bytes
    ("I\u00adX".encode(), b"IX"),
    ("", b""),
])
def test_normalize_password(pw, expected: bytes) -> None:
    assert normalize_password(pw) == expected


# --------------------------------------------------------------------------
# tls-server-end-point.


def make_cert(key, algo) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, algo))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("algo,digest", [
    (hashes.SHA256(), "sha256"),
    (hashes.SHA384(), "sha384"),
    (hashes.SHA512(), "sha512"),
])
def test_tls_server_end_point_rsa(rsa_key, algo, digest: str) -> None:
    der = make_cert(rsa_key, algo)
    assert tls_server_end_point(der) == hashlib.new(digest, der).digest()


# DER of the OIDs sha256WithRSAEncryption (1.2.840.113549.1.1.11), sha1WithRSAEncryption (.5)
# and md5WithRSAEncryption (.4): same length, last byte differs.
_SHA256_RSA_OID = bytes.fromhex("06092a864886f70d01010b")


@pytest.mark.parametrize("last", [0x05, 0x04], ids=["sha1", "md5"])
def test_tls_server_end_point_weak_hash_uses_sha256(rsa_key, last: int) -> None:
    """RFC 5929 §4.1: MD5 and SHA-1 signatures are bound with SHA-256.

    cryptography refuses to sign with SHA-1/MD5, so the certificate's signature
    algorithm OIDs are rewritten: the signature no longer verifies, but only
    the algorithm is read here.
    """
    der = make_cert(rsa_key, hashes.SHA256())
    assert der.count(_SHA256_RSA_OID) == 2
    weak = der.replace(_SHA256_RSA_OID, _SHA256_RSA_OID[:-1] + bytes([last]))
    assert x509.load_der_x509_certificate(weak).signature_hash_algorithm.name == ("sha1" if last == 5 else "md5")
    assert tls_server_end_point(weak) == hashlib.sha256(weak).digest()


def test_tls_server_end_point_ecdsa_sha384() -> None:
    der = make_cert(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


def test_tls_server_end_point_ed25519_has_no_hash() -> None:
    der = make_cert(ed25519.Ed25519PrivateKey.generate(), None)
    with pytest.raises(ValueError):
        tls_server_end_point(der)
