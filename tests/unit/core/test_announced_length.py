"""Every codec tells the buffer budget the whole length of a partly received message.

The pump asks ``decoder.announced_length()`` only while a message is
incomplete, so a message that cannot fit in the proxy's buffer budget is
refused at its header instead of after its body trickled in.  Checked on the
decoders the engines' pumps and handshakes use.
"""

from __future__ import annotations

import struct

import pytest

from dbproxy.buffer import ReceiveBuffer
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.codec import CqlDecoder
from dbproxy.engines.cassandra.segments import encode_segments
from dbproxy.engines.mongo.codec import MongoDecoder
from dbproxy.engines.mongo.engine import AttributingDecoder
from dbproxy.engines.postgres.codec import BackendDecoder, FrontendDecoder
from dbproxy.engines.postgres.codec import DEFAULT_MAX_MESSAGE_SIZE
from dbproxy.engines.postgres.tap import FRONTEND_SIDE
from dbproxy.tee import Tee

PG_QUERY = b"Q" + struct.pack(">i", 4 + 5000) + b"x" * 5000
MONGO = struct.pack("<iiii", 16 + 5000, 1, 0, 2013) + b"\x00" * 5000
CQL_V4 = struct.pack(">BBhBi", 4, 0, 3, F.Opcode.QUERY, 5000) + b"\x00" * 5000


@pytest.mark.parametrize(
    ("make", "message", "header"),
    [
        (lambda: FrontendDecoder(startup=False), PG_QUERY, 5),
        (lambda: BackendDecoder(), b"D" + PG_QUERY[1:], 5),
        (lambda: Tee(ReceiveBuffer(), FRONTEND_SIDE, limit=DEFAULT_MAX_MESSAGE_SIZE), PG_QUERY, 5),
        (lambda: FrontendDecoder(startup=True), struct.pack(">ii", 9000, 196608) + b"u" * 8992, 4),
        (lambda: MongoDecoder(), MONGO, 4),
        (lambda: AttributingDecoder(MongoDecoder(), "client"), MONGO, 4),
        (lambda: CqlDecoder("client"), CQL_V4, 9),
    ],
    ids=["pg-frontend", "pg-backend", "pg-framer", "pg-startup", "mongo", "mongo-attributing", "cql-frames"],
)
def test_announced_length_of_a_partial_message(make, message, header):
    dec = make()
    dec.feed(message[: header - 1])
    assert dec.announced_length() is None  # header not complete yet
    dec.feed(message[header - 1 : 1000])
    assert dec.announced_length() == len(message)


def test_announced_length_of_a_cql_frame_split_over_segments():
    frame = struct.pack(">BBhBi", 5, 0, 3, F.Opcode.QUERY, 300_000) + b"\x01" * 300_000
    wire = encode_segments(frame, compress=False)
    dec = CqlDecoder("client")
    dec.set_framing("segments")
    dec.feed(wire[: len(wire) // 2])  # the first of three segments (128 KiB payload at most, v5 spec 2.2) and more
    assert dec.next_message() is NEED_DATA
    assert dec.announced_length() == len(frame)
