"""engines/vnc/rfb.py on bytes: handshakes captured from a real Xtigervnc with real viewers
(``capture_rfb.py``: vncdotool and TigerVNC's viewer), each parsed whole, split at every byte
boundary and with trailing bytes; VNC authentication checked against the captured challenge; the
client messages framed the same however the stream is split; hypothesis for the framer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dbproxy.buffer import ReceiveBuffer
from dbproxy.engines.vnc import rfb
from dbproxy.errors import FrameTooLarge, RemoteProtocolError
from dbproxy.sansio import NEED_DATA

DATA = Path(__file__).resolve().parent / "data"
CASES = json.loads((DATA / "rfb-captures.json").read_text())


def _parse_all(data: bytes, steps: list, splits: list[int]) -> list:
    """Feed ``data`` in pieces cut at ``splits``; run ``steps`` (parsers) in order, each as soon as it can."""
    buf = ReceiveBuffer()
    out = []
    pieces = [data[a:b] for a, b in zip([0, *splits], [*splits, len(data)])]
    i = 0
    for piece in pieces:
        buf.feed(piece)
        while i < len(steps):
            before = buf.position
            got = steps[i](buf)
            if got is NEED_DATA:
                assert buf.position == before, "a parser consumed bytes and asked for more"
                break
            out.append(got)
            i += 1
    assert i == len(steps), f"only {i} of {len(steps)} messages parsed"
    return out, len(buf)


def _server_steps(version=rfb.RFB_38):
    return [rfb.parse_version, rfb.parse_security_types(version), rfb.parse_challenge,
            rfb.parse_security_result(version), rfb.parse_server_init]


def _client_steps():
    return [rfb.parse_version, rfb.parse_u8, rfb.parse_challenge, rfb.parse_u8]


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_handshake_whole_and_at_every_split(case):
    data = (DATA / f"{case}.s2c.bin").read_bytes()
    whole, left = _parse_all(data, _server_steps(), [])
    assert left == 0
    version, types, challenge, result, init = whole
    assert version == (3, 8) and types.types == (rfb.SEC_VNC,) and len(challenge) == 16 and result.ok
    assert init.raw == data[-len(init.raw):] and init.encode() == init.raw
    assert (init.width, init.height) == (640, 400) and len(init.pixel_format) == 16
    for cut in range(1, len(data)):
        assert _parse_all(data, _server_steps(), [cut])[0] == whole, cut
    # one byte at a time, then with bytes of the next phase behind it
    assert _parse_all(data, _server_steps(), list(range(1, len(data))))[0] == whole
    assert _parse_all(data + b"\x00\x01trailing", _server_steps(), [])[1] == 10


@pytest.mark.parametrize("case", sorted(CASES))
def test_vnc_authentication_answers_the_captured_challenge(case):
    s2c = (DATA / f"{case}.s2c.bin").read_bytes()
    c2s = (DATA / f"{case}.c2s.bin").read_bytes()
    (_, _, challenge, _, _), _ = _parse_all(s2c, _server_steps(), [])
    (version, chosen, response, shared), _ = _parse_all(c2s, _client_steps(), [])
    assert version == (3, 8) and chosen == rfb.SEC_VNC and shared in (0, 1)
    assert rfb.vnc_response(CASES[case]["password"].encode(), challenge) == response
    assert rfb.vnc_response(b"wrong", challenge) != response


def _client_messages(case: str) -> bytes:
    c2s = (DATA / f"{case}.c2s.bin").read_bytes()
    _, left = _parse_all(c2s, _client_steps(), [])
    return c2s[len(c2s) - left:]


def _frame(data: bytes, splits: list[int]) -> list:
    dec = rfb.ClientMessageDecoder()
    out = []
    for a, b in zip([0, *splits], [*splits, len(data)]):
        dec.feed(data[a:b])
        while (msg := dec.next_message()) is not NEED_DATA:
            out.append(msg)
    assert len(dec.buffer) == 0
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_client_messages_framed_at_every_split(case):
    data = _client_messages(case)
    whole = _frame(data, [])
    assert b"".join(m.raw for m in whole) == data
    for cut in range(1, len(data)):
        assert _frame(data, [cut]) == whole, cut
    assert _frame(data, list(range(1, len(data)))) == whole
    names = {m.name for m in whole}
    assert {"SetEncodings", "FramebufferUpdateRequest"} <= names, names
    if case == "tigervnc-vncdotool":
        assert {"KeyEvent", "PointerEvent", "ClientCutText"} <= names
        keys = [m.key() for m in whole if m.type == rfb.KEY_EVENT]
        assert [rfb.keysym_text(k) for down, k in keys if down] == ["l", "s", "\n"]
        cut = next(m for m in whole if m.type == rfb.CLIENT_CUT_TEXT)
        assert cut.cut_text() == b"clipboard text" and not cut.extended_cut_text
    else:
        # TigerVNC's viewer: fences and continuous updates (the framer knows them all)
        assert {"ClientFence", "EnableContinuousUpdates"} <= names, names
        encodings = next(m for m in whole if m.type == rfb.SET_ENCODINGS).encodings()
        assert -239 in encodings  # the Cursor pseudo-encoding among them


def test_message_builders_frame_back():
    built = [rfb.encode_key_event(True, 0x61), rfb.encode_pointer_event(1, 10, 20),
             rfb.encode_client_cut_text(b"abc"), rfb.encode_set_encodings((16, 0, -239)),
             rfb.encode_update_request(True, 0, 0, 640, 400),
             struct.pack(">BBHII", rfb.QEMU, 0, 1, 0x61, 30),  # QEMU extended key event
             struct.pack(">BxxxIB", rfb.CLIENT_FENCE, 0, 2) + b"ab",
             struct.pack(">BxHHBx", rfb.SET_DESKTOP_SIZE, 800, 600, 1) + bytes(16)]
    data = b"".join(built)
    msgs = _frame(data, list(range(1, len(data))))
    assert [m.raw for m in msgs] == built
    assert [m.is_input for m in msgs] == [True, True, False, False, False, True, False, False]
    assert msgs[5].key() == (True, 0x61)
    assert msgs[1].pointer() == (1, 10, 20)


def test_extended_clipboard_and_limits():
    ext = struct.pack(">Bxxxi", rfb.CLIENT_CUT_TEXT, -8) + bytes(8)
    (msg,) = _frame(ext, [])
    assert msg.extended_cut_text and len(msg.raw) == 16
    dec = rfb.ClientMessageDecoder(max_cut_text=100)
    dec.feed(struct.pack(">BxxxI", rfb.CLIENT_CUT_TEXT, 101))
    with pytest.raises(FrameTooLarge):
        dec.next_message()
    dec = rfb.ClientMessageDecoder()
    dec.feed(b"\x07rest")
    with pytest.raises(RemoteProtocolError, match="type 7 cannot be framed"):
        dec.next_message()


def test_version_and_security_encodings():
    buf = ReceiveBuffer()
    buf.feed(b"RFB 003.889\n")
    assert rfb.negotiate(rfb.parse_version(buf)) == rfb.RFB_33  # Apple's 3.889 is read as 3.3
    assert rfb.negotiate((3, 7)) == rfb.RFB_37 and rfb.negotiate((4, 0)) == rfb.RFB_38
    assert rfb.negotiate((3, 5)) == rfb.RFB_33
    buf.feed(b"HTTP/1.1 200")
    with pytest.raises(RemoteProtocolError):
        rfb.parse_version(buf)
    for version in (rfb.RFB_33, rfb.RFB_37, rfb.RFB_38):
        failure = rfb.encode_failure(version, "no entry")
        got, _ = _parse_all(failure, [rfb.parse_security_types(version)], list(range(1, len(failure))))
        assert got[0].failed and got[0].reason == "no entry"
    result = rfb.encode_security_result(rfb.RFB_38, False, "bad code")
    parsed = _parse_all(result, [rfb.parse_security_result(rfb.RFB_38)], [2, 5])[0][0]
    assert parsed == rfb.SecurityResult(False, "bad code")
    assert rfb.encode_security_result(rfb.RFB_37, False, "ignored") == b"\x00\x00\x00\x01"  # no reason before 3.8


def test_vencrypt_messages():
    sub = rfb.encode_vencrypt_subtypes((rfb.VENCRYPT_X509PLAIN, rfb.VENCRYPT_TLSVNC))
    assert _parse_all(sub, [rfb.parse_vencrypt_subtypes], list(range(1, len(sub))))[0] == [(262, 258)]
    plain = rfb.encode_plain("desk-1", "tok.en")
    (creds,), _ = _parse_all(plain, [rfb.parse_plain], list(range(1, len(plain))))
    assert creds == rfb.PlainCredentials("desk-1", "tok.en") and "tok.en" not in repr(creds)
    buf = ReceiveBuffer()
    buf.feed(struct.pack(">II", 10, 5000))
    with pytest.raises(FrameTooLarge):
        rfb.parse_plain(buf)


def test_vnc_key_reverses_bits_and_pads():
    assert rfb.vnc_key(b"\x01") == b"\x80" + bytes(7)
    assert rfb.vnc_key(b"longer than eight") == rfb.vnc_key(b"longer t")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=299), max_size=8))
def test_framer_same_result_however_split(data, cuts):
    """Arbitrary bytes: the framer gives the same messages (or the same error) whatever the split."""
    cuts = sorted({c for c in cuts if c < len(data)})

    def run(splits):
        try:
            dec = rfb.ClientMessageDecoder(max_cut_text=1000)
            out = []
            for a, b in zip([0, *splits], [*splits, len(data)]):
                dec.feed(data[a:b])
                while (msg := dec.next_message()) is not NEED_DATA:
                    out.append(msg.raw)
            return out, len(dec.buffer)
        except RemoteProtocolError as exc:
            return type(exc).__name__

    assert run(cuts) == run([])
