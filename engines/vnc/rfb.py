"""RFB (the VNC protocol, RFC 6143) handshake and client messages, sans-IO.

Strategy.  The RFB handshake is a fixed sequence of small messages whose
sizes the reader knows from the state it is in (a version line, a list of
security types, a 16-byte challenge, a SecurityResult…), so the handshake
is a set of *parsers*: each takes a ``ReceiveBuffer`` and returns the parsed
message, consuming exactly its bytes, or ``NEED_DATA`` consuming nothing —
the same result however the bytes were split.  The engine (which does the
I/O) calls the parser the state calls for; encoders return bytes.  VeNCrypt
(the TigerVNC/QEMU security type 19, "VeNCrypt" rfbproto §7.2.19) is here
too: version 0.2, its subtype list, Plain credentials.

After ServerInit the client→server direction is framed by
``ClientMessageDecoder`` (the ``dbproxy.sansio`` decoder shape: ``feed`` /
``next_message``), each message a frozen ``ClientMessage`` with its exact
``raw`` bytes: the RFC 6143 §7.5 messages plus the extensions whose length
the framing can know (EnableContinuousUpdates, ClientFence,
SetDesktopSize, xvp, GII, the QEMU client messages).  A message type the
proxy cannot frame is a ``RemoteProtocolError``: it cannot be audited or
policed, so it is not forwarded.  The server→client direction is framed in
``updates.py``.

VNC authentication (RFC 6143 §7.2.2): DES-ECB of the 16-byte challenge
with the password (first 8 bytes, NUL-padded) as key — each key byte with
its bits reversed, as the original VNC implementation loads DES keys.
``cryptography`` keeps single DES only as TripleDES with three equal keys
(its "decrepit" module), which is the same cipher.  No trio, no I/O.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import attrs

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, RemoteProtocolError
from dbproxy.sansio import NEED_DATA

# -- versions (RFC 6143 §7.1.1) ---------------------------------------------------------------
RFB_33 = (3, 3)
RFB_37 = (3, 7)
RFB_38 = (3, 8)
_VERSION = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

# -- security types (RFC 6143 §7.1.2, IANA "RFB Security Types") ------------------------------
SEC_INVALID = 0
SEC_NONE = 1
SEC_VNC = 2
SEC_VENCRYPT = 19
SECURITY_NAMES = {0: "Invalid", 1: "None", 2: "VNC", 5: "RA2", 6: "RA2ne", 16: "Tight", 17: "Ultra", 18: "TLS",
                  19: "VeNCrypt", 20: "SASL", 21: "MD5", 22: "xvp", 30: "AppleARD"}

# VeNCrypt subtypes (rfbproto §7.2.19; TigerVNC common/rfb/SecurityClient.cxx).  The TLS* subtypes use
# anonymous Diffie-Hellman TLS (no certificate), the X509* subtypes a certificate.
VENCRYPT_PLAIN = 256
VENCRYPT_TLSNONE = 257
VENCRYPT_TLSVNC = 258
VENCRYPT_TLSPLAIN = 259
VENCRYPT_X509NONE = 260
VENCRYPT_X509VNC = 261
VENCRYPT_X509PLAIN = 262
VENCRYPT_TLSSASL = 263
VENCRYPT_X509SASL = 264
VENCRYPT_NAMES = {256: "Plain", 257: "TLSNone", 258: "TLSVnc", 259: "TLSPlain", 260: "X509None", 261: "X509Vnc",
                  262: "X509Plain", 263: "TLSSASL", 264: "X509SASL", 1: "None", 2: "VncAuth"}
VENCRYPT_TLS = frozenset((257, 258, 259, 263))
VENCRYPT_X509 = frozenset((260, 261, 262, 264))

# Bounds for what the proxy buffers from a peer during the handshake.
MAX_REASON = 64 * 1024
MAX_NAME = 64 * 1024
MAX_CREDENTIAL = 4096

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")


def security_name(t: int) -> str:
    return SECURITY_NAMES.get(t, f"type {t}")


def vencrypt_name(t: int) -> str:
    return VENCRYPT_NAMES.get(t, f"subtype {t}")


# -- the version line ------------------------------------------------------------------------
def encode_version(version: tuple[int, int]) -> bytes:
    return b"RFB %03d.%03d\n" % version


def parse_version(buf: ReceiveBuffer) -> Any:
    """The 12-byte ProtocolVersion line → (major, minor); RFC 6143 §7.1.1."""
    if len(buf) < 12:
        return NEED_DATA
    raw = bytes(buf.copy(12))
    m = _VERSION.fullmatch(raw)
    if m is None:
        raise RemoteProtocolError(f"not an RFB protocol version line: {raw[:12]!r}",
                                  client_hint="the peer does not speak RFB (VNC)")
    buf.skip(12)
    return int(m.group(1)), int(m.group(2))


def negotiate(offered: tuple[int, int]) -> tuple[int, int]:
    """The version the proxy speaks with a peer that offered ``offered`` (3.3, 3.7 or 3.8).

    RFC 6143 §7.1.1: other numbers (Apple's 3.889, UltraVNC's 3.4/3.6/3.14…) do not implement the
    3.7/3.8 handshakes and are to be read as 3.3; a later major version gets the newest the proxy
    speaks, 3.8."""
    if offered in (RFB_37, RFB_38):
        return offered
    return RFB_38 if offered[0] > 3 else RFB_33


# -- small readers -------------------------------------------------------------------------
def parse_u8(buf: ReceiveBuffer) -> Any:
    if len(buf) < 1:
        return NEED_DATA
    value = buf.peek_byte()
    buf.skip(1)
    return value


def parse_u32(buf: ReceiveBuffer) -> Any:
    if len(buf) < 4:
        return NEED_DATA
    value = buf.u32_be()
    buf.skip(4)
    return value


def parse_bytes(n: int):
    def parse(buf: ReceiveBuffer) -> Any:
        if len(buf) < n:
            return NEED_DATA
        return buf.take(n)
    return parse


parse_challenge = parse_bytes(16)


def _string_at(buf: ReceiveBuffer, offset: int, limit: int, what: str) -> tuple[str, int] | None:
    """(text, bytes used) of a u32-length-prefixed string at ``offset``, or None while incomplete."""
    if len(buf) < offset + 4:
        return None
    n = buf.u32_be(offset)
    if n > limit:
        raise FrameTooLarge(n, limit, what=what)
    if len(buf) < offset + 4 + n:
        return None
    return bytes(buf.copy(n, offset + 4)).decode("utf-8", "replace"), 4 + n


@attrs.frozen
class SecurityTypes:
    """The server's security types (3.7+: a list; 3.3: the one the server chose), or its failure reason."""

    types: tuple[int, ...]
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return not self.types


def parse_security_types(version: tuple[int, int]):
    """RFC 6143 §7.1.2: 3.7+ ``u8 n, n × u8`` (n = 0: ``u32 length, reason``); 3.3: ``u32 type``
    (0: a reason follows)."""
    def parse(buf: ReceiveBuffer) -> Any:
        if version == RFB_33:
            if len(buf) < 4:
                return NEED_DATA
            t = buf.u32_be()
            if t == SEC_INVALID:
                got = _string_at(buf, 4, MAX_REASON, "failure reason")
                if got is None:
                    return NEED_DATA
                buf.skip(4 + got[1])
                return SecurityTypes((), got[0])
            buf.skip(4)
            return SecurityTypes((t,))
        if len(buf) < 1:
            return NEED_DATA
        n = buf.peek_byte()
        if n == 0:
            got = _string_at(buf, 1, MAX_REASON, "failure reason")
            if got is None:
                return NEED_DATA
            buf.skip(1 + got[1])
            return SecurityTypes((), got[0])
        if len(buf) < 1 + n:
            return NEED_DATA
        types = tuple(bytes(buf.copy(n, 1)))
        buf.skip(1 + n)
        return SecurityTypes(types)
    return parse


def encode_security_types(version: tuple[int, int], types: tuple[int, ...]) -> bytes:
    if version == RFB_33:
        return _U32.pack(types[0])
    return _U8.pack(len(types)) + bytes(types)


def encode_failure(version: tuple[int, int], reason: str) -> bytes:
    """The server refusing before any security type (RFC 6143 §7.1.2): a reason every version carries."""
    text = reason.encode("utf-8", "replace")
    if version == RFB_33:
        return _U32.pack(SEC_INVALID) + _U32.pack(len(text)) + text
    return b"\x00" + _U32.pack(len(text)) + text


@attrs.frozen
class SecurityResult:
    ok: bool
    reason: str | None = None


def parse_security_result(version: tuple[int, int]):
    """RFC 6143 §7.1.3: ``u32`` 0 OK, 1 failed (2: too many attempts, some servers); 3.8 adds a reason."""
    def parse(buf: ReceiveBuffer) -> Any:
        if len(buf) < 4:
            return NEED_DATA
        status = buf.u32_be()
        if status == 0:
            buf.skip(4)
            return SecurityResult(True)
        if version == RFB_38:
            got = _string_at(buf, 4, MAX_REASON, "failure reason")
            if got is None:
                return NEED_DATA
            buf.skip(4 + got[1])
            return SecurityResult(False, got[0])
        buf.skip(4)
        return SecurityResult(False, "too many attempts" if status == 2 else None)
    return parse


def encode_security_result(version: tuple[int, int], ok: bool, reason: str = "") -> bytes:
    if ok:
        return _U32.pack(0)
    if version == RFB_38:
        text = reason.encode("utf-8", "replace")
        return _U32.pack(1) + _U32.pack(len(text)) + text
    return _U32.pack(1)  # RFC 6143 §7.1.3: before 3.8 the server just closes after it


# -- VNC authentication (RFC 6143 §7.2.2) -----------------------------------------------------
def _reverse_bits(b: int) -> int:
    return int(f"{b:08b}"[::-1], 2)


_REVERSED = bytes(_reverse_bits(b) for b in range(256))


def vnc_key(password: bytes) -> bytes:
    """The DES key VNC derives from a password: 8 bytes, NUL-padded, each byte's bits reversed."""
    return password[:8].ljust(8, b"\0").translate(_REVERSED)


def vnc_response(password: bytes, challenge: bytes) -> bytes:
    """The client's answer to a 16-byte challenge: DES-ECB with the password's key."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    if len(challenge) != 16:
        raise ValueError("a VNC challenge is 16 bytes")
    key = vnc_key(password)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


# -- VeNCrypt (rfbproto §7.2.19) ---------------------------------------------------------------
VENCRYPT_VERSION = (0, 2)


def parse_vencrypt_version(buf: ReceiveBuffer) -> Any:
    if len(buf) < 2:
        return NEED_DATA
    major, minor = buf.peek_byte(), buf.peek_byte(1)
    buf.skip(2)
    return major, minor


def encode_vencrypt_version(version: tuple[int, int] = VENCRYPT_VERSION) -> bytes:
    return bytes(version)


def parse_vencrypt_subtypes(buf: ReceiveBuffer) -> Any:
    """``u8 n, n × u32`` (VeNCrypt 0.2)."""
    if len(buf) < 1:
        return NEED_DATA
    n = buf.peek_byte()
    if len(buf) < 1 + 4 * n:
        return NEED_DATA
    types = struct.unpack_from(f">{n}I", bytes(buf.copy(4 * n, 1)))
    buf.skip(1 + 4 * n)
    return tuple(types)


def encode_vencrypt_subtypes(types: tuple[int, ...]) -> bytes:
    return _U8.pack(len(types)) + b"".join(_U32.pack(t) for t in types)


@attrs.frozen
class PlainCredentials:
    username: str
    password: str = attrs.field(repr=False)


def parse_plain(buf: ReceiveBuffer) -> Any:
    """VeNCrypt Plain: ``u32 ulen, u32 plen, username, password``."""
    if len(buf) < 8:
        return NEED_DATA
    ulen, plen = buf.u32_be(), buf.u32_be(4)
    if ulen > MAX_CREDENTIAL or plen > MAX_CREDENTIAL:
        raise FrameTooLarge(max(ulen, plen), MAX_CREDENTIAL, what="VeNCrypt Plain credential")
    if len(buf) < 8 + ulen + plen:
        return NEED_DATA
    user = bytes(buf.copy(ulen, 8)).decode("utf-8", "replace")
    password = bytes(buf.copy(plen, 8 + ulen)).decode("utf-8", "replace")
    buf.skip(8 + ulen + plen)
    return PlainCredentials(user, password)


def encode_plain(username: str, password: str) -> bytes:
    u, p = username.encode(), password.encode()
    return _U32.pack(len(u)) + _U32.pack(len(p)) + u + p


# -- ServerInit (RFC 6143 §7.3.2) -------------------------------------------------------------
@attrs.frozen
class ServerInit:
    width: int
    height: int
    pixel_format: bytes  # 16 bytes, RFC 6143 §7.4
    name: str
    raw: bytes = b""

    def encode(self) -> bytes:
        name = self.name.encode("utf-8", "replace")
        return _U16.pack(self.width) + _U16.pack(self.height) + self.pixel_format + _U32.pack(len(name)) + name


def parse_server_init(buf: ReceiveBuffer) -> Any:
    if len(buf) < 24:
        return NEED_DATA
    n = buf.u32_be(20)
    if n > MAX_NAME:
        raise FrameTooLarge(n, MAX_NAME, what="desktop name")
    if len(buf) < 24 + n:
        return NEED_DATA
    raw = buf.take(24 + n)
    width, height = struct.unpack_from(">HH", raw)
    return ServerInit(width, height, raw[4:20], raw[24:].decode("utf-8", "replace"), raw)


# -- client messages (RFC 6143 §7.5 and registered extensions) --------------------------------
SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
SET_DESKTOP_SIZE = 251
GII = 253
XVP = 250
QEMU = 255
QEMU_EXTENDED_KEY_EVENT = 0
QEMU_AUDIO = 1

CLIENT_MESSAGE_NAMES = {0: "SetPixelFormat", 2: "SetEncodings", 3: "FramebufferUpdateRequest", 4: "KeyEvent",
                        5: "PointerEvent", 6: "ClientCutText", 150: "EnableContinuousUpdates", 248: "ClientFence",
                        250: "xvp", 251: "SetDesktopSize", 253: "gii", 255: "QEMU"}
# ClientFence flags (rfbproto "ClientFence"): a request whose answer comes after the next message.
FENCE_REQUEST = 0x80000000
FENCE_SYNC_NEXT = 4
FENCE_SYNC_REQUEST = FENCE_REQUEST | FENCE_SYNC_NEXT
# The client's input: what view-only drops.
INPUT_TYPES = frozenset((KEY_EVENT, POINTER_EVENT))

# Extended clipboard (a ClientCutText with a negative length, rfbproto "Extended Clipboard
# Pseudo-Encoding"): flags say which formats, and whether it is a caps/request/notify/provide.
EXT_CLIPBOARD_PROVIDE = 1 << 27
DEFAULT_MAX_CUT_TEXT = 16 * 1024 * 1024

_FIXED = {SET_PIXEL_FORMAT: 20, FRAMEBUFFER_UPDATE_REQUEST: 10, KEY_EVENT: 8, POINTER_EVENT: 6,
          ENABLE_CONTINUOUS_UPDATES: 10, XVP: 4}


@attrs.frozen
class ClientMessage:
    type: int
    raw: bytes

    @property
    def name(self) -> str:
        if self.type == QEMU and len(self.raw) > 1:
            return {0: "QEMUExtendedKeyEvent", 1: "QEMUAudio"}.get(self.raw[1], "QEMU")
        return CLIENT_MESSAGE_NAMES.get(self.type, f"type {self.type}")

    @property
    def is_input(self) -> bool:
        """Keys and the pointer (QEMU's extended key event too)."""
        return self.type in INPUT_TYPES or (self.type == QEMU and self.raw[1] == QEMU_EXTENDED_KEY_EVENT)

    # -- fields, parsed on demand ------------------------------------------------------------
    def encodings(self) -> tuple[int, ...]:
        n = _U16.unpack_from(self.raw, 2)[0]
        return struct.unpack_from(f">{n}i", self.raw, 4)

    def key(self) -> tuple[bool, int]:
        """(down, keysym) of a KeyEvent (QEMU extended: its keysym)."""
        if self.type == QEMU:
            return bool(_U16.unpack_from(self.raw, 2)[0]), _U32.unpack_from(self.raw, 4)[0]
        return bool(self.raw[1]), _U32.unpack_from(self.raw, 4)[0]

    def pointer(self) -> tuple[int, int, int]:
        """(button mask, x, y) of a PointerEvent."""
        return self.raw[1], *struct.unpack_from(">HH", self.raw, 2)

    def cut_text(self) -> bytes:
        """The text of a ClientCutText (Latin-1 in RFC 6143 §7.5.6; the extended form: its payload)."""
        return self.raw[8:]

    @property
    def extended_cut_text(self) -> bool:
        return self.type == CLIENT_CUT_TEXT and _I32.unpack_from(self.raw, 4)[0] < 0

    def pixel_format(self) -> bytes:
        return self.raw[4:20]

    def fence_flags(self) -> int:
        return _U32.unpack_from(self.raw, 4)[0]


def encode_key_event(down: bool, keysym: int) -> bytes:
    return struct.pack(">BBxxI", KEY_EVENT, 1 if down else 0, keysym)


def encode_pointer_event(mask: int, x: int, y: int) -> bytes:
    return struct.pack(">BBHH", POINTER_EVENT, mask, x, y)


def encode_client_cut_text(text: bytes) -> bytes:
    return struct.pack(">BxxxI", CLIENT_CUT_TEXT, len(text)) + text


def encode_set_encodings(encodings: tuple[int, ...]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", SET_ENCODINGS, len(encodings), *encodings)


def encode_update_request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", FRAMEBUFFER_UPDATE_REQUEST, 1 if incremental else 0, x, y, w, h)


def client_message_size(data: Any, pos: int, end: int, max_cut_text: int) -> int | None:
    """Wire size of the client message at ``pos`` (None: more bytes needed to know it).

    Raises ``RemoteProtocolError`` for a type the proxy cannot frame, ``FrameTooLarge`` for a
    cut text above ``max_cut_text``."""
    avail = end - pos
    if avail < 1:
        return None
    t = data[pos]
    fixed = _FIXED.get(t)
    if fixed is not None:
        return fixed
    if t == SET_ENCODINGS:
        if avail < 4:
            return None
        return 4 + 4 * _U16.unpack_from(data, pos + 2)[0]
    if t == CLIENT_CUT_TEXT:
        if avail < 8:
            return None
        n = _I32.unpack_from(data, pos + 4)[0]
        n = -n if n < 0 else n  # extended clipboard: |length| bytes of flags and (zlib) payload
        if n > max_cut_text:
            raise FrameTooLarge(n, max_cut_text, what="ClientCutText")
        return 8 + n
    if t == CLIENT_FENCE:
        if avail < 9:
            return None
        return 9 + data[pos + 8]
    if t == SET_DESKTOP_SIZE:
        if avail < 7:
            return None
        return 8 + 16 * data[pos + 6]
    if t == GII:
        if avail < 4:
            return None
        return 4 + _U16.unpack_from(data, pos + 2)[0]  # big-endian length (the proxy asks for no GII)
    if t == QEMU:
        if avail < 2:
            return None
        sub = data[pos + 1]
        if sub == QEMU_EXTENDED_KEY_EVENT:
            return 12
        if sub == QEMU_AUDIO:
            if avail < 4:
                return None
            op = _U16.unpack_from(data, pos + 2)[0]
            return 10 if op == 2 else 4
        raise RemoteProtocolError(f"QEMU client message subtype {sub} cannot be framed",
                                  client_hint=f"the proxy does not relay QEMU client message subtype {sub}")
    raise RemoteProtocolError(f"client message type {t} cannot be framed",
                              client_hint=f"the proxy does not relay RFB client message type {t}")


class ClientMessageDecoder:
    """The client→server direction after ServerInit (the ``dbproxy.sansio`` decoder shape)."""

    def __init__(self, max_cut_text: int = DEFAULT_MAX_CUT_TEXT) -> None:
        self.buffer = ReceiveBuffer()
        self.max_cut_text = max_cut_text

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Any:
        data, pos, end = self.buffer.span()
        size = client_message_size(data, pos, end, self.max_cut_text)
        if size is None or end - pos < size:
            return NEED_DATA
        raw = self.buffer.take(size)
        return ClientMessage(raw[0], raw)

    def announced_length(self) -> int | None:
        data, pos, end = self.buffer.span()
        try:
            return client_message_size(data, pos, end, self.max_cut_text)
        except RemoteProtocolError:
            return None


# -- keysyms as text (for the optional key audit) ---------------------------------------------
_KEYSYM_NAMES = {0xFF08: "\b", 0xFF09: "\t", 0xFF0D: "\n", 0xFF8D: "\n", 0xFF1B: "<Esc>", 0xFFFF: "<Del>",
                 0xFF51: "<Left>", 0xFF52: "<Up>", 0xFF53: "<Right>", 0xFF54: "<Down>"}


def keysym_text(keysym: int) -> str:
    """What a key press types, as text (X11 keysyms: Latin-1 map to themselves, 0x01000000 + code
    point for the rest of Unicode); modifiers and other function keys give ''."""
    if 0x20 <= keysym <= 0x7E or 0xA0 <= keysym <= 0xFF:
        return chr(keysym)
    if 0x01000100 <= keysym <= 0x0110FFFF:
        return chr(keysym - 0x01000000)
    return _KEYSYM_NAMES.get(keysym, "")


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)
