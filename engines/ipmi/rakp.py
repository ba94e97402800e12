"""RMCP+ session establishment, sans-IO: Open Session and RAKP 1–4 in both roles.

Strategy.  IPMI v2.0 §13.17–§13.31 in two small state objects that take
and return payloads (bytes), never sockets:

- ``BmcHandshake``: the proxy acting as the BMC toward the client
  (``ipmitool -I lanplus``).  Open Session Request → Response (the cipher
  suite is picked from the client's proposal, §13.17); RAKP 1 → RAKP 2
  (the caller supplies the password Kuid for the user name RAKP 1 names, or
  None: status "unauthorized name"); RAKP 3 → RAKP 4 after checking the
  client's HMAC (status "invalid integrity check value" when it does not
  match).  The RAKP 4 is built only once the caller says the session may
  start (the proxy first logs in to the real BMC), with a status code of the
  caller's choosing when it may not.
- ``ConsoleHandshake``: the proxy acting as a remote console toward the real
  BMC with the route's stored credential: the same four messages from the
  other side, checking the BMC's RAKP 2 and RAKP 4 HMACs.

Keys (§13.31, §13.32): SIK = HMAC_Kg(Rm | Rc | ROLEm | ULENGTHm | UNAMEm)
with Kg = Kuid (no BMC key); K1 = HMAC_SIK(01h × 20), K2 = HMAC_SIK(02h × 20)
— the constants are 20 bytes for every algorithm, SHA-256 included (as
ipmitool and OpenIPMI compute them).  The HMAC is the authentication
algorithm's (RAKP-HMAC-SHA1 → SHA-1, RAKP-HMAC-SHA256 → SHA-256).  Byte
orders: session ids are little-endian everywhere; random numbers and GUIDs
are used as the bytes on the wire.

Supported cipher suites (§22.15.2, table 22-20): 3 (RAKP-HMAC-SHA1,
HMAC-SHA1-96, AES-CBC-128) and 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128,
AES-CBC-128).  Nothing weaker: no "none" algorithms, no MD5.
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Callable

import attrs

from .rmcp import (CONF_AES_CBC_128, INTEGRITY_HMAC_SHA1_96, INTEGRITY_HMAC_SHA256_128, Integrity, IpmiError,
                   SessionKeys)

# Authentication algorithms (§13.28, table 13-17)
AUTH_RAKP_HMAC_SHA1 = 0x01
AUTH_RAKP_HMAC_SHA256 = 0x03

# RMCP+ and RAKP message status codes (§13.24, table 13-15)
STATUS_OK = 0x00
STATUS_NO_RESOURCES = 0x01
STATUS_INVALID_SESSION_ID = 0x02
STATUS_INVALID_PAYLOAD_TYPE = 0x03
STATUS_INVALID_AUTH_ALG = 0x04
STATUS_INVALID_INTEGRITY_ALG = 0x05
STATUS_INACTIVE_SESSION = 0x08
STATUS_INVALID_ROLE = 0x09
STATUS_UNAUTHORIZED_ROLE = 0x0A
STATUS_INVALID_NAME_LENGTH = 0x0C
STATUS_UNAUTHORIZED_NAME = 0x0D
STATUS_INVALID_INTEGRITY_CHECK = 0x0F
STATUS_INVALID_CONF_ALG = 0x10
STATUS_NO_CIPHER_SUITE_MATCH = 0x11
STATUS_ILLEGAL_PARAMETER = 0x12

STATUS_NAMES = {
    STATUS_OK: "no errors", STATUS_NO_RESOURCES: "insufficient resources to create a session",
    STATUS_INVALID_SESSION_ID: "invalid session id", STATUS_INVALID_PAYLOAD_TYPE: "invalid payload type",
    STATUS_INVALID_AUTH_ALG: "invalid authentication algorithm",
    STATUS_INVALID_INTEGRITY_ALG: "invalid integrity algorithm", STATUS_INACTIVE_SESSION: "inactive session id",
    STATUS_INVALID_ROLE: "invalid role", STATUS_UNAUTHORIZED_ROLE: "unauthorized role or privilege level",
    STATUS_INVALID_NAME_LENGTH: "invalid name length", STATUS_UNAUTHORIZED_NAME: "unauthorized name",
    STATUS_INVALID_INTEGRITY_CHECK: "invalid integrity check value",
    STATUS_INVALID_CONF_ALG: "invalid confidentiality algorithm",
    STATUS_NO_CIPHER_SUITE_MATCH: "no cipher suite match", STATUS_ILLEGAL_PARAMETER: "illegal parameter",
}

# Privilege levels (§6.8)
PRIV_CALLBACK, PRIV_USER, PRIV_OPERATOR, PRIV_ADMIN, PRIV_OEM = 1, 2, 3, 4, 5
PRIV_NAMES = {0: "highest", 1: "callback", 2: "user", 3: "operator", 4: "administrator", 5: "oem"}
NAME_ONLY_LOOKUP = 0x10  # ROLEm bit 4 (§13.20)
MAX_USERNAME = 16
PASSWORD_SIZE = 20  # Kuid: IPMI v2.0 passwords are up to 20 bytes, zero-padded (§13.31)


@attrs.frozen
class CipherSuite:
    id: int
    auth: int
    digest: str  # the RAKP HMAC's
    integrity: Integrity
    confidentiality: int

    @property
    def auth_code_size(self) -> int:
        """RAKP 2/3 key exchange auth codes: the full HMAC (§13.21, §13.22)."""
        return 20 if self.digest == "sha1" else 32

    @property
    def icv_size(self) -> int:
        """The RAKP 4 integrity check value: the integrity algorithm's truncation (§13.23)."""
        return self.integrity.size

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.digest).digest()


SUITE_3 = CipherSuite(3, AUTH_RAKP_HMAC_SHA1, "sha1", INTEGRITY_HMAC_SHA1_96, CONF_AES_CBC_128)
SUITE_17 = CipherSuite(17, AUTH_RAKP_HMAC_SHA256, "sha256", INTEGRITY_HMAC_SHA256_128, CONF_AES_CBC_128)
SUITES = {3: SUITE_3, 17: SUITE_17}
_BY_ALGORITHMS = {(s.auth, s.integrity.number, s.confidentiality): s for s in SUITES.values()}


def kuid(password: bytes) -> bytes:
    if len(password) > PASSWORD_SIZE:
        raise ValueError("an IPMI v2.0 password is at most 20 bytes")
    return password.ljust(PASSWORD_SIZE, b"\0")


def session_keys(suite: CipherSuite, sik: bytes, random: Callable[[int], bytes] = os.urandom) -> SessionKeys:
    k1 = suite.hmac(sik, b"\x01" * 20)
    k2 = suite.hmac(sik, b"\x02" * 20)
    return SessionKeys(suite.integrity, k1, k2, suite.confidentiality, random)


# -- messages (§13.17–§13.23) ------------------------------------------------------------------


@attrs.frozen
class OpenSessionRequest:
    tag: int
    privilege: int
    console_sid: int
    auth: int
    integrity: int
    confidentiality: int

    def encode(self) -> bytes:
        return struct.pack("<BBHI", self.tag, self.privilege, 0, self.console_sid) + _algorithm(0, self.auth) + \
            _algorithm(1, self.integrity) + _algorithm(2, self.confidentiality)

    @classmethod
    def decode(cls, p: bytes) -> "OpenSessionRequest":
        if len(p) != 32:
            raise IpmiError(f"Open Session Request of {len(p)} bytes (expected 32)")
        tag, priv, _, sid = struct.unpack_from("<BBHI", p)
        algs = [_parse_algorithm(p[8 + 8 * i:16 + 8 * i], i) for i in range(3)]
        return cls(tag, priv & 0x0F, sid, *algs)


def _algorithm(kind: int, number: int) -> bytes:
    return struct.pack("<BHBB3x", kind, 0, 8, number)


def _parse_algorithm(b: bytes, kind: int) -> int:
    if b[0] != kind or b[3] != 8:
        raise IpmiError(f"Open Session Request: malformed algorithm payload {kind}")
    return b[4] & 0x3F


@attrs.frozen
class OpenSessionResponse:
    tag: int
    status: int
    privilege: int = 0
    console_sid: int = 0
    bmc_sid: int = 0
    auth: int = 0
    integrity: int = 0
    confidentiality: int = 0

    def encode(self) -> bytes:
        head = struct.pack("<BBBxI", self.tag, self.status, self.privilege, self.console_sid)
        if self.status != STATUS_OK:
            return head  # an error response ends after the console's session id (§13.18)
        return head + struct.pack("<I", self.bmc_sid) + _algorithm(0, self.auth) + _algorithm(1, self.integrity) + \
            _algorithm(2, self.confidentiality)

    @classmethod
    def decode(cls, p: bytes) -> "OpenSessionResponse":
        if len(p) < 8:
            raise IpmiError("Open Session Response truncated")
        tag, status, priv, sid = struct.unpack_from("<BBBxI", p)
        if status != STATUS_OK:
            return cls(tag, status, priv, sid)
        if len(p) != 36:
            raise IpmiError(f"Open Session Response of {len(p)} bytes (expected 36)")
        (bmc_sid,) = struct.unpack_from("<I", p, 8)
        algs = [_parse_algorithm(p[12 + 8 * i:20 + 8 * i], i) for i in range(3)]
        return cls(tag, status, priv, sid, bmc_sid, *algs)


@attrs.frozen
class Rakp1:
    tag: int
    bmc_sid: int
    console_random: bytes
    role: int  # the whole ROLEm byte (privilege | lookup bit)
    username: bytes

    def encode(self) -> bytes:
        return struct.pack("<B3xI", self.tag, self.bmc_sid) + self.console_random + \
            struct.pack("<BxxB", self.role, len(self.username)) + self.username

    @classmethod
    def decode(cls, p: bytes) -> "Rakp1":
        if len(p) < 28:
            raise IpmiError("RAKP 1 truncated")
        tag, sid = struct.unpack_from("<B3xI", p)
        role, length = p[24], p[27]
        if length > MAX_USERNAME or len(p) != 28 + length:
            raise IpmiError("RAKP 1: user name length does not match the message")
        return cls(tag, sid, bytes(p[8:24]), role, bytes(p[28:]))


@attrs.frozen
class Rakp2:
    tag: int
    status: int
    console_sid: int
    bmc_random: bytes = b""
    bmc_guid: bytes = b""
    auth_code: bytes = b""

    def encode(self) -> bytes:
        head = struct.pack("<BBxxI", self.tag, self.status, self.console_sid)
        return head if self.status != STATUS_OK else head + self.bmc_random + self.bmc_guid + self.auth_code

    @classmethod
    def decode(cls, p: bytes) -> "Rakp2":
        if len(p) < 8:
            raise IpmiError("RAKP 2 truncated")
        tag, status, sid = struct.unpack_from("<BBxxI", p)
        if status != STATUS_OK:
            return cls(tag, status, sid)
        if len(p) < 40:
            raise IpmiError("RAKP 2 truncated")
        return cls(tag, status, sid, bytes(p[8:24]), bytes(p[24:40]), bytes(p[40:]))


@attrs.frozen
class Rakp3:
    tag: int
    status: int
    bmc_sid: int
    auth_code: bytes = b""

    def encode(self) -> bytes:
        return struct.pack("<BBxxI", self.tag, self.status, self.bmc_sid) + self.auth_code

    @classmethod
    def decode(cls, p: bytes) -> "Rakp3":
        if len(p) < 8:
            raise IpmiError("RAKP 3 truncated")
        tag, status, sid = struct.unpack_from("<BBxxI", p)
        return cls(tag, status, sid, bytes(p[8:]))


@attrs.frozen
class Rakp4:
    tag: int
    status: int
    console_sid: int
    icv: bytes = b""

    def encode(self) -> bytes:
        return struct.pack("<BBxxI", self.tag, self.status, self.console_sid) + \
            (self.icv if self.status == STATUS_OK else b"")

    @classmethod
    def decode(cls, p: bytes) -> "Rakp4":
        if len(p) < 8:
            raise IpmiError("RAKP 4 truncated")
        tag, status, sid = struct.unpack_from("<BBxxI", p)
        return cls(tag, status, sid, bytes(p[8:]))


# -- the computations (§13.31–§13.32) --------------------------------------------------------


def rakp2_auth_code(suite: CipherSuite, key: bytes, console_sid: int, bmc_sid: int, rm: bytes, rc: bytes,
                    guid: bytes, role: int, username: bytes) -> bytes:
    return suite.hmac(key, struct.pack("<II", console_sid, bmc_sid) + rm + rc + guid +
                      bytes((role, len(username))) + username)


def rakp3_auth_code(suite: CipherSuite, key: bytes, rc: bytes, console_sid: int, role: int, username: bytes) -> bytes:
    return suite.hmac(key, rc + struct.pack("<I", console_sid) + bytes((role, len(username))) + username)


def sik(suite: CipherSuite, kg: bytes, rm: bytes, rc: bytes, role: int, username: bytes) -> bytes:
    return suite.hmac(kg, rm + rc + bytes((role, len(username))) + username)


def rakp4_icv(suite: CipherSuite, sik_: bytes, rm: bytes, bmc_sid: int, guid: bytes) -> bytes:
    return suite.hmac(sik_, rm + struct.pack("<I", bmc_sid) + guid)[:suite.icv_size]


class HandshakeFailed(Exception):
    """A RAKP exchange that cannot go on: ``status`` is the RMCP+ status code to answer or that was received."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def new_session_id(random: Callable[[int], bytes] = os.urandom) -> int:
    while True:
        sid = int.from_bytes(random(4), "little")
        if sid:
            return sid


# -- the proxy as the BMC ----------------------------------------------------------------------


@attrs.define(eq=False)
class BmcHandshake:
    """The BMC side of RMCP+ session establishment toward one client.

    Use: ``open_session(payload) -> bytes``; ``rakp1(payload) -> Rakp1`` then
    ``rakp2(password_or_None) -> bytes``; ``rakp3(payload) -> Rakp3`` (raises
    HandshakeFailed with the status to answer) then ``rakp4(status=0) ->
    bytes``.  After a successful ``rakp4``, ``keys`` and ``bmc_sid`` /
    ``console_sid`` make the session.
    """

    guid: bytes
    suites: tuple[int, ...] = (3, 17)
    random: Callable[[int], bytes] = os.urandom
    suite: CipherSuite | None = None
    console_sid: int = 0
    bmc_sid: int = 0
    privilege: int = PRIV_ADMIN
    tag: int = 0
    rm: bytes = b""
    rc: bytes = b""
    role: int = 0
    username: bytes = b""
    _kuid: bytes | None = attrs.field(default=None, repr=False)
    _sik: bytes | None = attrs.field(default=None, repr=False)
    keys: SessionKeys | None = None

    def open_session(self, payload: bytes, *, max_privilege: int = PRIV_ADMIN) -> bytes:
        req = OpenSessionRequest.decode(payload)
        suite = _BY_ALGORITHMS.get((req.auth, req.integrity, req.confidentiality))
        if suite is None or suite.id not in self.suites:
            return OpenSessionResponse(req.tag, STATUS_NO_CIPHER_SUITE_MATCH, 0, req.console_sid).encode()
        if req.privilege > PRIV_OEM or req.privilege > max_privilege:
            return OpenSessionResponse(req.tag, STATUS_INVALID_ROLE, 0, req.console_sid).encode()
        if self.bmc_sid == 0:
            self.bmc_sid = new_session_id(self.random)
        self.suite, self.console_sid, self.tag = suite, req.console_sid, req.tag
        # 0 asks for "the highest level matching the proposed algorithms" (§13.17): ours is max_privilege.
        self.privilege = req.privilege or max_privilege
        return OpenSessionResponse(req.tag, STATUS_OK, self.privilege, self.console_sid, self.bmc_sid, suite.auth,
                                   suite.integrity.number, suite.confidentiality).encode()

    def rakp1(self, payload: bytes) -> Rakp1:
        msg = Rakp1.decode(payload)
        if self.suite is None:
            raise HandshakeFailed("RAKP 1 before Open Session", STATUS_INACTIVE_SESSION)
        if msg.bmc_sid != self.bmc_sid:
            raise HandshakeFailed("RAKP 1 names another session", STATUS_INVALID_SESSION_ID)
        if (msg.role & 0x0F) > PRIV_OEM or (msg.role & 0x0F) > self.privilege:
            raise HandshakeFailed(f"RAKP 1 asks for privilege {msg.role & 0x0F}", STATUS_UNAUTHORIZED_ROLE)
        self.tag, self.rm, self.role, self.username = msg.tag, msg.console_random, msg.role, msg.username
        return msg

    def rakp2(self, password: bytes | None) -> bytes:
        """RAKP 2 for the user RAKP 1 named, keyed with ``password`` (None: "unauthorized name")."""
        assert self.suite is not None
        if password is None:
            return Rakp2(self.tag, STATUS_UNAUTHORIZED_NAME, self.console_sid).encode()
        self._kuid = kuid(password)
        if not self.rc:
            self.rc = self.random(16)
        code = rakp2_auth_code(self.suite, self._kuid, self.console_sid, self.bmc_sid, self.rm, self.rc, self.guid,
                               self.role, self.username)
        return Rakp2(self.tag, STATUS_OK, self.console_sid, self.rc, self.guid, code).encode()

    def error(self, status: int) -> bytes:
        """A RAKP 2 with an error status (before a password is known)."""
        return Rakp2(self.tag, status, self.console_sid).encode()

    def rakp3(self, payload: bytes) -> Rakp3:
        msg = Rakp3.decode(payload)
        if self.suite is None or self._kuid is None:
            raise HandshakeFailed("RAKP 3 before RAKP 2", STATUS_INACTIVE_SESSION)
        self.tag = msg.tag
        if msg.bmc_sid != self.bmc_sid:
            raise HandshakeFailed("RAKP 3 names another session", STATUS_INVALID_SESSION_ID)
        if msg.status != STATUS_OK:
            raise HandshakeFailed(f"the client ended the handshake: RAKP 3 status {msg.status:#04x} "
                                  f"({STATUS_NAMES.get(msg.status, 'unknown')})", msg.status)
        expected = rakp3_auth_code(self.suite, self._kuid, self.rc, self.console_sid, self.role, self.username)
        if not hmac.compare_digest(expected, msg.auth_code):
            raise HandshakeFailed("RAKP 3 auth code does not match the password", STATUS_INVALID_INTEGRITY_CHECK)
        self._sik = sik(self.suite, self._kuid, self.rm, self.rc, self.role, self.username)
        return msg

    def rakp4(self, status: int = STATUS_OK) -> bytes:
        assert self.suite is not None
        if status != STATUS_OK:
            return Rakp4(self.tag, status, self.console_sid).encode()
        assert self._sik is not None
        icv = rakp4_icv(self.suite, self._sik, self.rm, self.bmc_sid, self.guid)
        self.keys = session_keys(self.suite, self._sik, self.random)
        self._kuid = None  # the password is no longer needed
        return Rakp4(self.tag, STATUS_OK, self.console_sid, icv).encode()


# -- the proxy as the remote console -----------------------------------------------------------


@attrs.define(eq=False)
class ConsoleHandshake:
    """The console side toward a BMC: ``open_session_request()`` → ``rakp1(response)`` →
    ``rakp3(rakp2)`` → ``finish(rakp4)``; each raises HandshakeFailed (with the BMC's status) or
    IpmiError (malformed)."""

    suite: CipherSuite
    username: bytes
    password: bytes = attrs.field(repr=False)
    privilege: int = PRIV_ADMIN
    random: Callable[[int], bytes] = os.urandom
    tag: int = 0
    console_sid: int = 0
    bmc_sid: int = 0
    rm: bytes = b""
    rc: bytes = b""
    guid: bytes = b""
    keys: SessionKeys | None = None
    _sik: bytes | None = attrs.field(default=None, repr=False)

    @property
    def role(self) -> int:
        return self.privilege | NAME_ONLY_LOOKUP

    def open_session_request(self) -> bytes:
        if len(self.username) > MAX_USERNAME:
            raise ValueError("an IPMI user name is at most 16 bytes")
        if not self.console_sid:
            self.console_sid = new_session_id(self.random)
        self.tag = (self.tag + 1) & 0xFF
        s = self.suite
        return OpenSessionRequest(self.tag, self.privilege, self.console_sid, s.auth, s.integrity.number,
                                  s.confidentiality).encode()

    def rakp1(self, payload: bytes) -> bytes:
        resp = OpenSessionResponse.decode(payload)
        if resp.status != STATUS_OK:
            raise HandshakeFailed(f"Open Session refused: {STATUS_NAMES.get(resp.status, hex(resp.status))}",
                                  resp.status)
        s = self.suite
        if resp.console_sid != self.console_sid or (resp.auth, resp.integrity, resp.confidentiality) != \
                (s.auth, s.integrity.number, s.confidentiality):
            raise HandshakeFailed("Open Session Response does not match the request", STATUS_ILLEGAL_PARAMETER)
        self.bmc_sid = resp.bmc_sid
        self.rm = self.random(16)
        self.tag = (self.tag + 1) & 0xFF
        return Rakp1(self.tag, self.bmc_sid, self.rm, self.role, self.username).encode()

    def rakp3(self, payload: bytes) -> bytes:
        msg = Rakp2.decode(payload)
        if msg.status != STATUS_OK:
            raise HandshakeFailed(f"RAKP 2: {STATUS_NAMES.get(msg.status, hex(msg.status))}", msg.status)
        if msg.console_sid != self.console_sid:
            raise HandshakeFailed("RAKP 2 names another session", STATUS_INVALID_SESSION_ID)
        key = kuid(self.password)
        expected = rakp2_auth_code(self.suite, key, self.console_sid, self.bmc_sid, self.rm, msg.bmc_random,
                                   msg.bmc_guid, self.role, self.username)
        if not hmac.compare_digest(expected, msg.auth_code):
            raise HandshakeFailed("RAKP 2 auth code does not match the stored password", STATUS_INVALID_INTEGRITY_CHECK)
        self.rc, self.guid = msg.bmc_random, msg.bmc_guid
        self._sik = sik(self.suite, key, self.rm, self.rc, self.role, self.username)
        self.tag = (self.tag + 1) & 0xFF
        return Rakp3(self.tag, STATUS_OK, self.bmc_sid,
                     rakp3_auth_code(self.suite, key, self.rc, self.console_sid, self.role, self.username)).encode()

    def finish(self, payload: bytes) -> SessionKeys:
        msg = Rakp4.decode(payload)
        if msg.status != STATUS_OK:
            raise HandshakeFailed(f"RAKP 4: {STATUS_NAMES.get(msg.status, hex(msg.status))}", msg.status)
        assert self._sik is not None
        if msg.console_sid != self.console_sid or not hmac.compare_digest(
                rakp4_icv(self.suite, self._sik, self.rm, self.bmc_sid, self.guid), msg.icv):
            raise HandshakeFailed("RAKP 4 integrity check value does not match", STATUS_INVALID_INTEGRITY_CHECK)
        self.keys = session_keys(self.suite, self._sik, self.random)
        return self.keys
