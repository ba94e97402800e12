"""CQL answers when the proxy ends a session for a memory bound (dbproxy.buffer, issue 13 §3).

The frame the client is still sending gets OVERLOADED (buffer budget) or
PROTOCOL_ERROR (deadline) on its own stream; requests still waiting for the
backend get SERVER_ERROR; for a backend-side bound only the waiting ones.
"""

from __future__ import annotations

import struct

from dbproxy.channel import MessageStream
from dbproxy.errors import BufferBudgetExceeded, MessageTimeout
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.codec import CqlDecoder
from dbproxy.engines.cassandra.observers import CqlSessionState, _Pending
from dbproxy.engines.cassandra.prepared import PreparedCache
from dbproxy.engines.cassandra.clientwire import ClientWire



def _errors(data: bytes) -> list[tuple[int, int, str]]:
    dec = CqlDecoder("server")
    dec.feed(data)
    out = []
    while (frame := dec.next_message()) is not None and hasattr(frame, "opcode"):
        err = F.parse_error(frame)
        out.append((frame.stream, err.code, err.message))
    return out


def _session(partial: bytes):
    wire = ClientWire(MessageStream(None, CqlDecoder("client")))
    wire.version = 4
    wire.channel.decoder.feed(partial)
    state = CqlSessionState(backend="127.0.0.1:9042", prepared=PreparedCache(), version=4)
    state.pending[9] = _Pending(None, "query", "select 1")
    return wire, state


# A v4 QUERY on stream 5 announcing a 1 MB body, of which 100 bytes arrived.
PARTIAL = struct.pack(">BBhBi", 4, 0, 5, F.Opcode.QUERY, 1_000_000) + b"\x00" * 100


def test_budget_refusal_is_overloaded_on_the_partial_frames_stream():
    wire, state = _session(PARTIAL)
    exc = BufferBudgetExceeded(1_000_009, 100, 1 << 20)
    exc.direction = "client"
    errors = _errors(wire.pipeline_error(state, exc))
    assert errors == [
        (5, F.ErrorCode.OVERLOADED, exc.client_hint),
        (9, F.ErrorCode.SERVER_ERROR, exc.client_hint),
    ]
    assert not state.pending


def test_deadline_is_protocol_error_on_the_partial_frames_stream():
    wire, state = _session(PARTIAL)
    exc = MessageTimeout(60, 109)
    exc.direction = "client"
    errors = _errors(wire.pipeline_error(state, exc))
    assert errors == [
        (5, F.ErrorCode.PROTOCOL_ERROR, "message not received in time (the proxy waits 60 s for a message to complete)"),
        (9, F.ErrorCode.SERVER_ERROR, exc.client_hint),
    ]


def test_backend_side_bound_answers_the_waiting_requests():
    wire, state = _session(PARTIAL)  # the client's partial frame is not what the proxy refused
    exc = BufferBudgetExceeded(50_000_000, 100, 1 << 20)
    exc.direction = "backend"
    assert _errors(wire.pipeline_error(state, exc)) == [(9, F.ErrorCode.SERVER_ERROR, exc.client_hint)]
