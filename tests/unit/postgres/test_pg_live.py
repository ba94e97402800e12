"""The codec and the auth math against a real PostgreSQL 15 (throwaway instance).

A tiny blocking socket client built only from this package (encoders,
BackendDecoder, ScramClient, md5_password, tls_server_end_point) logs in and
runs ``select 1``.  The server checks the SCRAM proof, and over TLS the
channel binding: SCRAM-SHA-256-PLUS succeeds only if tls_server_end_point
hashes the certificate (ECDSA P-384 / SHA-384 here) exactly as PostgreSQL does.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import struct
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dbproxy.sansio import NEED_DATA
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.auth import SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramClient, md5_password, tls_server_end_point
from dbproxy.engines.postgres.codec import BackendDecoder
from tests.support import peer_missing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_throwaway  # noqa: E402
from pg_throwaway import MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER  # noqa: E402

pytestmark = pytest.mark.integration


def _self_signed_p384() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA384()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def codec_pg():
    """Our own instance (not the shared ``pg`` peer): a non-ASCII SCRAM password and a P-384 certificate."""
    if not pg_throwaway.available():
        peer_missing("PostgreSQL 15 server binaries; run scripts/install/postgres.sh")
    cert, key = _self_signed_p384()
    server = pg_throwaway.ThrowawayPostgres(tls_cert_pem=cert, tls_key_pem=key).start()
    try:
        yield server
    finally:
        server.stop()


class LoginFailed(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M"))
        self.fields = fields


class Client:
    """Blocking client over the sans-IO codec (test only)."""

    def __init__(self, port: int, *, tls: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.dec = BackendDecoder()
        self.cert_der: bytes | None = None
        if tls:
            self.sock.sendall(m.encode_ssl_request())
            while (answer := self.dec.read_ssl_answer()) is NEED_DATA:
                self._fill()
            assert answer == b"S"
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock)
            self.dec.encryption_established()
            self.cert_der = self.sock.getpeercert(binary_form=True)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.dec.feed(data)

    def recv(self) -> m.Message:
        while (msg := self.dec.next_message()) is NEED_DATA:
            self._fill()
        return msg

    def login(self, user: str, password: str, *, plus: bool = True, cb_override: bytes | None = None) -> str | None:
        """Returns the SASL mechanism used (None for md5)."""
        self.sock.sendall(m.encode_startup({"user": user, "database": "postgres"}))
        scram: ScramClient | None = None
        while True:
            msg = self.recv()
            if msg.type == m.BE.ERROR_RESPONSE:
                raise LoginFailed(m.parse_error_fields(msg))
            if msg.type == m.BE.READY_FOR_QUERY:
                assert m.parse_ready_for_query(msg) == "I"
                return scram.mechanism if scram else None
            if msg.type != m.BE.AUTHENTICATION:
                continue
            auth = m.parse_authentication(msg)
            if auth.subtype == m.AUTH_SASL:
                mechs = m.sasl_mechanisms(auth.data)
                if self.cert_der is not None and plus and SCRAM_SHA_256_PLUS in mechs:
                    cb = cb_override if cb_override is not None else tls_server_end_point(self.cert_der)
                    scram = ScramClient(password, cb)
                else:
                    scram = ScramClient(password, binding_supported=self.cert_der is not None)
                self.sock.sendall(m.encode_sasl_initial(scram.mechanism, scram.client_first()))
            elif auth.subtype == m.AUTH_SASL_CONTINUE:
                self.sock.sendall(m.encode_sasl_response(scram.client_final(auth.data)))
            elif auth.subtype == m.AUTH_SASL_FINAL:
                scram.verify_server_final(auth.data)
            elif auth.subtype == m.AUTH_MD5_PASSWORD:
                self.sock.sendall(m.encode_password(md5_password(user, password, auth.data)))
            else:
                assert auth.subtype == m.AUTH_OK

    def query(self, sql: str) -> tuple[list[bytes | None], str]:
        """First column of each row, and the command tag."""
        self.sock.sendall(m.encode_query(sql))
        rows: list[bytes | None] = []
        tag = ""
        while True:
            msg = self.recv()
            if msg.type == m.BE.DATA_ROW:
                (n,) = struct.unpack_from(">i", msg.raw, 7)
                rows.append(None if n < 0 else msg.raw[11:11 + n])
            elif msg.type == m.BE.COMMAND_COMPLETE:
                tag = m.parse_command_complete(msg)
            elif msg.type == m.BE.ERROR_RESPONSE:
                raise LoginFailed(m.parse_error_fields(msg))
            elif msg.type == m.BE.READY_FOR_QUERY:
                return rows, tag

    def close(self) -> None:
        try:
            self.sock.sendall(m.encode_terminate())
        finally:
            self.sock.close()


def test_scram_login_and_select_1(codec_pg) -> None:
    c = Client(codec_pg.port)
    try:
        assert c.login(SCRAM_USER, SCRAM_PASSWORD) == SCRAM_SHA_256
        rows, tag = c.query("select 1")
        assert (rows, tag, m.rows_from_tag(tag)) == ([b"1"], "SELECT 1", 1)
    finally:
        c.close()


def test_scram_plus_over_tls_with_sha384_certificate(codec_pg) -> None:
    c = Client(codec_pg.port, tls=True)
    try:
        assert c.login(SCRAM_USER, SCRAM_PASSWORD) == SCRAM_SHA_256_PLUS
        rows, _ = c.query("select ssl::text from pg_stat_ssl where pid = pg_backend_pid()")
        assert rows == [b"true"]
    finally:
        c.close()


def test_scram_over_tls_without_binding_sends_y_flag(codec_pg) -> None:
    c = Client(codec_pg.port, tls=True)
    try:
        # The server offered -PLUS but we bind nothing: flag 'n' would be fine, 'y' is checked
        # by the server against its offer and must be rejected (downgrade protection).
        with pytest.raises(LoginFailed) as ei:
            c.login(SCRAM_USER, SCRAM_PASSWORD, plus=False)
        assert "channel binding negotiation" in ei.value.fields["M"]
    finally:
        c.sock.close()


def test_scram_plus_wrong_binding_rejected(codec_pg) -> None:
    c = Client(codec_pg.port, tls=True)
    try:
        with pytest.raises(LoginFailed) as ei:
            c.login(SCRAM_USER, SCRAM_PASSWORD, cb_override=b"\0" * 48)
        assert ei.value.fields["S"] == "FATAL"
        assert "channel binding check failed" in ei.value.fields["M"]
    finally:
        c.sock.close()


def test_scram_wrong_password(codec_pg) -> None:
    c = Client(codec_pg.port)
    try:
        with pytest.raises(LoginFailed) as ei:
            c.login(SCRAM_USER, "not the password")
        assert (ei.value.fields["S"], ei.value.fields["C"]) == ("FATAL", "28P01")
    finally:
        c.sock.close()


def test_md5_login(codec_pg) -> None:
    c = Client(codec_pg.port)
    try:
        assert c.login(MD5_USER, MD5_PASSWORD) is None
        rows, _ = c.query("select current_user")
        assert rows == [MD5_USER.encode()]
    finally:
        c.close()
