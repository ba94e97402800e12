"""The pipeline's side of the malformed-message rule (issue 13 §1), on in-memory streams.

A message that framed but whose body a stage could not parse is audited as ``audit.malformed`` on
the session's audit before anything of its batch is sent; the messages before it are forwarded, it
and what follows are not, and the client gets its error.  A ``MalformedMessage`` says what it was;
any other ProtocolError a stage raises over a decoded message is described from the message's
``raw``; a decoder's ``MalformedMessage`` is audited too; a framing error (bad length) is not a
malformed body and writes no such event.
"""

from __future__ import annotations

import trio

from dbproxy.audit import events as ev
from dbproxy.errors import MalformedMessage, RemoteProtocolError
from dbproxy.pipeline import NEED_DATA, Pipeline
from tests.unit.core.test_pipeline import LengthDecoder, Recv, frame


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, kind: str, **fields) -> dict:
        self.events.append((kind, fields))
        return fields


class Session:
    def __init__(self) -> None:
        self.audit = Audit()


class Parses:
    """A stage that reads bodies: ``bad…`` does not parse (plain error), ``evil…`` raises MalformedMessage."""

    name = "parses"

    def handle(self, msg, ctx):
        if msg.body.startswith(b"bad"):
            raise RemoteProtocolError("body does not parse", client_hint="malformed body")
        if msg.body.startswith(b"evil"):
            raise MalformedMessage("evil body", client_hint="malformed evil", type_name="Evil", type_code="E",
                                   raw=msg.raw)
        return None


class MalformedDecoder(LengthDecoder):
    """Frames like LengthDecoder; a body starting ``rot`` is refused by the decoder itself."""

    def next_message(self):
        buf = self.buffer
        if len(buf) >= 5:
            n = int.from_bytes(bytes(buf.peek(2)), "big")
            head = bytes(buf.peek(min(len(buf), 2 + n)))
            if len(head) == 2 + n and head[2:5] == b"rot":  # refused before it is consumed, as decoders must
                raise MalformedMessage("rotten", type_name="Rot", type_code=1, raw=head)
        return super().next_message()


async def run(data: bytes, decoder=None) -> tuple[Session, bytes, bytes]:
    client_side, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend_side = trio.testing.memory_stream_pair()
    session = Session()
    p = Pipeline(session=session, client=proxy_client, backend=proxy_backend,
                 client_decoder=decoder or LengthDecoder(), backend_decoder=LengthDecoder(),
                 client_stages=[Parses()], backend_stages=[],
                 client_error=lambda exc: frame(b"ERR:" + exc.client_hint.encode()))
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client_side.send_all(data)
    sent, answered = Recv(backend_side), Recv(client_side)
    with trio.move_on_after(0.2):
        await sent.until(1 << 20)
    with trio.move_on_after(0.2):
        await answered.until(1 << 20)
    return session, sent.data, answered.data


async def test_a_stage_parse_error_is_audited_from_the_message_raw():
    bad = frame(b"bad body " + b"x" * 100)
    session, sent, answered = await run(frame(b"one") + bad + frame(b"never"))
    assert sent == frame(b"one")
    assert answered == frame(b"ERR:malformed body")
    [(kind, fields)] = session.audit.events
    assert kind == ev.MALFORMED and ev.CODES[kind] == "TAU01W"
    assert fields["direction"] == "client" and fields["success"] is False
    assert fields["message_type"] == "Frame" and fields["length"] == len(bad)
    assert fields["prefix_hex"] == bad[:64].hex() and fields["truncated"] is True
    assert fields["error"] == "body does not parse"


async def test_a_malformed_message_from_a_stage_says_what_it_was():
    bad = frame(b"evil")
    session, sent, answered = await run(frame(b"one") + frame(b"two") + bad)
    assert sent == frame(b"one") + frame(b"two")
    assert answered == frame(b"ERR:malformed evil")
    [(kind, fields)] = session.audit.events
    assert (kind, fields["message_type"], fields["message_code"]) == (ev.MALFORMED, "Evil", "E")
    assert fields["prefix_hex"] == bad.hex() and fields["truncated"] is False


async def test_a_decoders_malformed_message_is_audited_but_a_framing_error_is_not():
    session, sent, _ = await run(frame(b"one") + frame(b"rotten") + frame(b"never"), MalformedDecoder())
    assert sent == frame(b"one")
    assert [(k, f["message_type"], f["prefix_hex"]) for k, f in session.audit.events] == [
        (ev.MALFORMED, "Rot", frame(b"rotten").hex())]
    session, sent, answered = await run(frame(b"one") + b"\x00\x00")  # length 0: a framing error
    assert sent == frame(b"one") and answered == frame(b"ERR:bad frame")
    assert session.audit.events == []
