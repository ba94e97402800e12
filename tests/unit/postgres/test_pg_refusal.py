"""BackendDecoder: the ErrorResponse a server sends instead of the answer byte to
SSLRequest / GSSENCRequest (§55.2.10, §55.2.11).

The answer read returns ``b"E"`` without consuming it; ``read_refusal`` then
reads the error whole, bounded, in either shape a real server uses (v3
ErrorResponse, or a pre-14 server's pre-startup ``'E'`` + text + NUL), so the
backend login can log it and close the connection instead of decoding it as
the answer to its StartupMessage.  Each case whole, byte by byte, and with
trailing bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dbproxy.errors import FrameTooLarge, ProtocolError, RemoteProtocolError
from dbproxy.pipeline import NEED_DATA
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import MAX_REFUSAL_LENGTH, BackendDecoder, Refusal

V3 = m.encode_error("FATAL", "08P01", "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.0")
# What report_fork_failure_to_client wrote before PostgreSQL 14: no length, text + NUL.
V2 = b"Ecould not fork new process for connection: Resource temporarily unavailable\n\0"
TAIL = m.encode_auth_ok() + b"garbage"


def refusal_of(stream: bytes, kind: str, step: int | None = None) -> tuple[bytes, Refusal, BackendDecoder]:
    dec = BackendDecoder()
    read_answer = dec.read_ssl_answer if kind == "ssl" else dec.read_gssenc_answer
    chunks = [stream] if step is None else [stream[i:i + step] for i in range(0, len(stream), step)]
    answer = refusal = None
    for chunk in chunks:
        dec.feed(chunk)
        if answer is None:
            answer = read_answer()
            if answer is NEED_DATA:
                answer = None
                continue
            assert answer == b"E"
        if refusal is None:
            got = dec.read_refusal()
            if got is not NEED_DATA:
                refusal = got
    assert refusal is not None, stream
    return answer, refusal, dec


@pytest.mark.parametrize("kind", ["ssl", "gss"])
@pytest.mark.parametrize("step", [None, 1, 3])
@pytest.mark.parametrize("tail", [b"", TAIL])
def test_v3_error_is_read_whole_and_consumed(kind, step, tail) -> None:
    answer, refusal, dec = refusal_of(V3 + tail, kind, step)
    assert answer == b"E"
    assert refusal.raw == V3
    assert refusal.fields["C"] == "08P01" and refusal.fields["M"].startswith("unsupported frontend protocol")
    # Only the error was consumed; what follows is the caller's to ignore (it closes the link).
    assert len(dec.buffer) == len(tail)


@pytest.mark.parametrize("kind", ["ssl", "gss"])
@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize("tail", [b"", TAIL])
def test_pre_v3_error_text_to_nul(kind, step, tail) -> None:
    answer, refusal, dec = refusal_of(V2 + tail, kind, step)
    assert refusal.raw == V2
    assert refusal.fields == {"M": "could not fork new process for connection: Resource temporarily unavailable"}
    assert len(dec.buffer) == len(tail)


def test_refusal_is_bounded_before_buffering_more() -> None:
    """No length an error would have and no NUL: refused once MAX_REFUSAL_LENGTH bytes
    are in, whatever the server keeps sending (it is not authenticated)."""
    for head in (b"E\x7f\xff\xff\xff", b"EFATAL", "EÉCHEC".encode()):
        dec = BackendDecoder()
        dec.feed(head)
        assert dec.read_ssl_answer() == b"E"
        assert dec.read_refusal() is NEED_DATA
        fed = len(head)
        with pytest.raises(FrameTooLarge):
            while True:
                dec.feed(b"x" * 1000)
                fed += 1000
                assert dec.read_refusal() is NEED_DATA
                assert fed <= MAX_REFUSAL_LENGTH + 1000
    # A v3 length out of bounds is refused as soon as it is in.
    for length, error in ((MAX_REFUSAL_LENGTH + 1, FrameTooLarge), (0x00FFFFFF, FrameTooLarge), (7, RemoteProtocolError)):
        dec = BackendDecoder()
        dec.feed(b"E" + length.to_bytes(4, "big"))
        assert dec.read_ssl_answer() == b"E"
        with pytest.raises(error):
            dec.read_refusal()
    # The largest plausible v3 error is still read.
    body = b"SFATAL\0C08P01\0M" + b"m" * (MAX_REFUSAL_LENGTH - 4 - 17) + b"\0\0"
    big = b"E" + (4 + len(body)).to_bytes(4, "big") + body
    assert 4 + len(body) == MAX_REFUSAL_LENGTH
    dec = BackendDecoder()
    dec.feed(big)
    assert dec.read_gssenc_answer() == b"E"
    assert dec.read_refusal().raw == big


def test_refusal_needs_an_E() -> None:
    dec = BackendDecoder()
    assert dec.read_refusal() is NEED_DATA
    dec.feed(b"N")
    with pytest.raises(RemoteProtocolError):
        dec.read_refusal()


def test_malformed_v3_error_is_a_protocol_error() -> None:
    dec = BackendDecoder()
    dec.feed(b"E\0\0\0\x09SFATAL")  # no terminator inside its length
    assert dec.read_ssl_answer() == b"E"
    with pytest.raises(RemoteProtocolError):
        dec.read_refusal()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), chunk=st.integers(1, 40))
def test_fuzz_refusal(data: bytes, chunk: int) -> None:
    """Whatever follows the 'E': a refusal that is a prefix of the stream, NEED_DATA, or a
    ProtocolError; never more buffered than was fed."""
    stream = b"E" + data
    dec = BackendDecoder()
    got = NEED_DATA
    try:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i:i + chunk])
            got = dec.read_refusal()
            if got is not NEED_DATA:
                break
    except ProtocolError:
        return
    if got is not NEED_DATA:
        assert stream.startswith(got.raw)
        assert len(got.raw) + len(dec.buffer) == len(stream[:i + chunk])
