"""Every sans-IO decoder gives the same result however its input is split.

A TCP peer decides where reads end, not the protocol, so a decoder's output
must be a function of the byte stream alone.  For each decoder of the project
and each stream (real captures in tests/data/<protocol>/, and streams built
by hypothesis from the codecs' own encoders), the stream is fed as a pump
feeds it (``dbproxy.pipeline.Pipeline._pump``: ``feed``; ``mark``;
``next_message`` until NEED_DATA or an error; ``consumed_since_mark``;
``compact``), cut whole, one byte at a time and at hypothesis-chosen points,
and the outcome must equal the whole-stream one:

- the same messages (``raw`` bytes and header fields),
- the same total consumed (what the pump forwarded),
- the same error (class, message, client hint, and the attributes an engine
  renders its answer from: CQL ``stream``/``version``, Mongo
  ``mongo_header``), raised after the same consumed prefix — also on corrupted
  streams (hypothesis flips a byte, truncates, or appends garbage).

Within every batch the pipeline's invariant is checked: the consumed span is
the wire bytes of the messages returned — ``b"".join(raw)`` for PostgreSQL,
Mongo (OP_COMPRESSED included: ``raw`` is the compressed message as sent)
and CQL frames (v3/v4 LZ4/Snappy bodies included: ``raw`` is the compressed
frame); for CQL v5 segments ``raw`` is the frame inside the segments, so the
span must be whole segments whose CRC-checked, decompressed payloads
concatenate to the returned frames' ``raw`` (a frame split over segments
included).

Decoders covered: PostgreSQL ``FrontendDecoder`` (start-up and typed phases),
``BackendDecoder`` (with the SSL/GSSENC answer byte), the tap's ``Tee`` ("framer")
(which must also agree with the real decoders on the consumed prefix, the
error and the tapped frames); CQL ``CqlDecoder`` both directions, frames
(plain, LZ4, Snappy) and v5 segments (plain, LZ4), switching framing where an
engine does, and the backend's error-tagging ``BackendDecoder``; Mongo
``MongoDecoder`` and the engine's ``AttributingDecoder``.  (The GSSENC
transport in engines/postgres/gssenc.py is a stream that reads exact lengths,
not a decoder fed by a pump.)

Arbitrary bytes behind a plausible first header (``test_garbage_splits``)
check that every early check a decoder makes on a partial header agrees with
the one it makes on the whole header.

Where a decoder's result did differ by split, a named test states the rule:

- PostgreSQL's answer to SSLRequest / GSSENCRequest (§55.2.10): plaintext
  behind 'S'/'G' is refused with one error whatever the reads; the answer is
  consumed only when it is returned (``test_ssl_answer_rule_*``).
- Mongo: a messageLength below 16 is refused as such before the opcode is
  looked at, and the engine answers no request header behind it; a refused
  OP_COMPRESSED is answered as OP_MSG whether or not its originalOpcode had
  arrived (``test_mongo_*_alike_whatever_the_split``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import ProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import segments as S
from dbproxy.engines.cassandra.backend import BackendDecoder as CqlBackendDecoder
from dbproxy.engines.cassandra.codec import CqlDecoder
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.codec import MongoDecoder
from dbproxy.engines.mongo.engine import AttributingDecoder
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import BackendDecoder, FrontendDecoder
from dbproxy.engines.postgres.tap import BACKEND_SIDE, FRONTEND_SIDE
from dbproxy.tee import Tee

DATA = Path(__file__).resolve().parents[1] / "data"
SPLITS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------
# The pump, as dbproxy.pipeline drives a decoder.


@attrs.frozen
class Outcome:
    messages: tuple
    consumed: int
    error: tuple | None
    extra: Any = None


@attrs.define
class Spec:
    """How to run one decoder over one stream.

    ``make()`` returns ``(decoder, step, state)``: ``step(decoder)`` is what the
    pump calls until NEED_DATA (``next_message``, plus the engine's handshake
    moves: SSL answer, CQL framing switches); ``state`` is handed to ``span``
    and ``extra``.  ``key`` turns a message into comparable fields; ``span``
    checks one batch's consumed bytes against its messages (the pipeline
    invariant); ``extra`` reports decoder state that must not depend on splits.
    """

    name: str
    make: Callable[[], tuple]
    key: Callable[[Any], tuple]
    span: Callable[[Any, bytes, list, Any], None]
    extra: Callable[[Any, Any], Any] = lambda dec, state: None


def error_key(exc: ProtocolError) -> tuple:
    return (
        type(exc).__name__,
        str(exc),
        getattr(exc, "client_hint", None),
        getattr(exc, "stream", None),
        getattr(exc, "version", None),
        getattr(exc, "size", None),
        getattr(exc, "limit", None),
        getattr(exc, "mongo_side", None),
        getattr(exc, "mongo_header", None),
    )


def pump(spec: Spec, chunks: list[bytes]) -> Outcome:
    dec, step, state = spec.make()
    buf = dec.buffer
    messages: list = []
    consumed = 0
    error = None
    for i, chunk in enumerate(chunks):
        if not chunk:
            continue  # a pump never feeds b"": an empty read is EOF
        fed = True
        try:
            dec.feed(chunk)
        except ProtocolError as exc:  # the PG backend decoder refuses plaintext after 'S'/'G'
            error, fed = error_key(exc), False
        buf.mark()
        batch: list = []
        start = buf.position
        if state is not None:
            state["batch_start"] = start
            state["batch_count"] = 0
        try:
            while error is None and (msg := step(dec)) is not NEED_DATA:
                batch.append(msg)
        except ProtocolError as exc:
            error = error_key(exc)
        span = buf.consumed_since_mark()
        assert len(span) == buf.position - start
        spec.span(dec, span, batch, state)
        consumed += len(span)
        messages += [spec.key(x) for x in batch]
        buf.compact()
        if error is not None:
            # The session ends here; later reads stay unread (buffered, so what is
            # left compares equal whatever the cuts).
            for rest in chunks[i + (1 if fed else 0):]:
                buf.feed(rest)
            break
    return Outcome(tuple(messages), consumed, error, spec.extra(dec, state))


def cut_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def chunks_strategy(data: bytes):
    """Cut points: whole, few random, many random, or fixed-size steps."""
    n = len(data)
    if n < 2:
        return st.just([data])
    few = st.lists(st.integers(1, n - 1), max_size=8).map(lambda c: cut_at(data, c))
    many = st.lists(st.integers(1, n - 1), min_size=8, max_size=200).map(lambda c: cut_at(data, c))
    steps = st.integers(1, max(1, min(n, 4096))).map(lambda k: cut_at(data, range(k, n, k)) if n // k <= 5000 else [data])
    return st.one_of(st.just([data]), few, many, steps)


def mutations(data: bytes):
    """A corrupted copy of ``data``: one byte flipped, truncated, or garbage appended."""
    n = len(data)
    flip = st.tuples(st.integers(0, max(0, n - 1)), st.integers(1, 255)).map(
        lambda t: data[:t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1:] if n else b"\x00"
    )
    truncate = st.integers(0, n).map(lambda k: data[:k])
    garbage = st.binary(min_size=1, max_size=64).map(lambda g: data + g)
    return st.one_of(flip, truncate, garbage)


def assert_split_invariant(spec: Spec, data: bytes, chunks: list[bytes]) -> Outcome:
    whole = pump(spec, [data])
    assert b"".join(chunks) == data
    got = pump(spec, chunks)
    assert got == whole, f"{spec.name}: split {[len(c) for c in chunks][:40]} differs from whole"
    return whole


def check_all_cuts(spec: Spec, data: bytes) -> Outcome:
    """Whole, byte by byte (small streams) and a few fixed steps."""
    whole = pump(spec, [data])
    cuts = [bytewise(data)] if len(data) <= 16384 else []
    cuts += [cut_at(data, range(k, len(data), k)) for k in (2, 7, 64, 997, 4096)]
    for chunks in cuts:
        got = pump(spec, chunks)
        assert got == whole, f"{spec.name}: chunks of {len(chunks[0])} differ from whole"
    return whole


def raw_span(dec, span: bytes, batch: list, state) -> None:
    assert span == b"".join(bytes(x.raw) for x in batch)


# --------------------------------------------------------------------------
# PostgreSQL.

PG = DATA / "postgres"
PG_CAPTURES = sorted(p.name[:-len(".fe.bin")] for p in PG.glob("*.fe.bin"))


@attrs.frozen
class Answer:
    """The SSL/GSSENC answer byte as a pseudo-message (``raw`` = what it consumed)."""

    answer: bytes

    @property
    def raw(self) -> bytes:
        return self.answer if self.answer != b"E" else b""  # 'E' is left for next_message


def pg_key(msg) -> tuple:
    if isinstance(msg, Answer):
        return ("answer", msg.answer)
    if isinstance(msg, m.StartupMessage):
        return ("startup", msg.protocol, tuple(sorted(msg.params.items())), bytes(msg.raw))
    return (type(msg).__name__, getattr(msg, "type", None), bytes(msg.raw))


def pg_frontend(*, startup: bool = True, limit: int = 1 << 30) -> Spec:
    return Spec(
        "pg frontend",
        lambda: (FrontendDecoder(startup=startup, max_message_size=limit), FrontendDecoder.next_message, None),
        pg_key,
        raw_span,
        lambda dec, state: (dec.in_startup, len(dec.buffer)),
    )


def pg_backend(*, answer: str | None = None, limit: int = 1 << 30) -> Spec:
    """``answer``: 'ssl' / 'gss' when the stream starts with the answer to SSLRequest / GSSENCRequest."""

    def make():
        dec = BackendDecoder(max_message_size=limit)
        state = {"answer": None}
        read = dec.read_ssl_answer if answer == "ssl" else dec.read_gssenc_answer

        def step(d):
            if answer is not None and state["answer"] is None:
                got = read()
                if got is NEED_DATA:
                    return NEED_DATA
                state["answer"] = got
                # After 'S'/'G' the caller would hand the socket to TLS/GSS; this pump keeps
                # feeding the decoder the raw stream, i.e. plaintext behind the answer.
                return Answer(got)
            return d.next_message()

        return dec, step, state

    return Spec("pg backend", make, pg_key, raw_span, lambda dec, state: len(dec.buffer))


def pg_framer(direction: str, *, limit: int = 1 << 30) -> Spec:
    # The tapped side without its body checks: framing alone is compared here (test_tap_malformed has the checks).
    side = attrs.evolve(FRONTEND_SIDE if direction == "fe" else BACKEND_SIDE, checks={},
                        watch=FRONTEND_SIDE.watch)

    def make():
        state = {"tapped": []}
        framer = Tee(ReceiveBuffer(), side, limit=limit, tap=state["tapped"].append)
        return framer, Tee.next_message, state

    def span(dec, span, batch, state):
        assert not batch  # the Tee yields no messages

    return Spec(
        f"pg framer {direction}", make, pg_key, span,
        lambda dec, state: (dec.frames, m.FE.TERMINATE in dec.seen, b"".join(state["tapped"]), len(dec.buffer)),
    )


def typed_part(name: str, side: str) -> bytes:
    """The capture past its start-up packets / SSL answer: what a session's pumps frame."""
    data = (PG / f"{name}.{side}.bin").read_bytes()
    if side == "be":
        return data[1:] if name == "psql_sslprefer" else data
    dec = FrontendDecoder()
    dec.feed(data)
    skip = 0
    while dec.in_startup and (msg := dec.next_message()) is not NEED_DATA:
        skip += len(msg.raw)
    return data[skip:]


@pytest.mark.parametrize("name", PG_CAPTURES)
def test_pg_captures_every_cut(name: str) -> None:
    fe = (PG / f"{name}.fe.bin").read_bytes()
    be = (PG / f"{name}.be.bin").read_bytes()
    out = check_all_cuts(pg_frontend(), fe)
    assert out.error is None and out.consumed == len(fe)
    out = check_all_cuts(pg_backend(answer="ssl" if name == "psql_sslprefer" else None), be)
    assert out.error is None and out.consumed == len(be)


@pytest.mark.parametrize("name", PG_CAPTURES)
@pytest.mark.parametrize("side", ["fe", "be"])
def test_pg_framer_agrees_with_decoder(name: str, side: str) -> None:
    data = typed_part(name, side)
    real = pg_frontend(startup=False) if side == "fe" else pg_backend()
    interest = (FRONTEND_SIDE if side == "fe" else BACKEND_SIDE).interest
    for chunks in ([data], bytewise(data), cut_at(data, range(13, len(data), 13))):
        want = pump(real, chunks)
        got = pump(pg_framer(side), chunks)
        frames, _terminated, tapped, _left = got.extra
        assert (got.consumed, got.error, frames) == (want.consumed, want.error, len(want.messages))
        assert tapped == b"".join(x[2] for x in want.messages if x[1] in interest)


TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)


@st.composite
def pg_typed_stream(draw, direction: str) -> bytes:
    """Typed messages from the encoders and arbitrary (type, body) frames."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            parts.append(m.encode_query(draw(TEXT)) if direction == "fe"
                         else m.encode_error("ERROR", "42601", draw(TEXT)))
        else:
            t = draw(st.sampled_from(b"QPBDESHXCdcfpZTDKNAtnsI2319" if direction == "fe" else b"RSKZTDCEINnsAVvGHWcdt123"))
            parts.append(m.encode_message(t, draw(st.binary(max_size=60))))
    return b"".join(parts)


@st.composite
def pg_frontend_stream(draw) -> bytes:
    head = b""
    if draw(st.booleans()):
        head += m.encode_ssl_request()
    params = draw(st.dictionaries(st.sampled_from(["user", "database", "application_name", "DateStyle"]),
                                  st.text(alphabet="abcXYZ_ 0123", max_size=12), max_size=4))
    head += m.encode_startup({"user": "u", **params})
    return head + draw(pg_typed_stream("fe"))



@SPLITS
@given(data=st.data())
def test_pg_generated_splits(data) -> None:
    fe = data.draw(pg_frontend_stream())
    assert_split_invariant(pg_frontend(), fe, data.draw(chunks_strategy(fe)))
    be = data.draw(st.sampled_from([b"", b"N"])) + data.draw(pg_typed_stream("be"))
    spec = pg_backend(answer="ssl" if be[:1] == b"N" else None)
    assert_split_invariant(spec, be, data.draw(chunks_strategy(be)))


@SPLITS
@given(data=st.data(), name=st.sampled_from(PG_CAPTURES), side=st.sampled_from(["fe", "be"]),
       limit=st.sampled_from([1 << 30, 64, 8]))
def test_pg_corrupted_splits(data, name: str, side: str, limit: int) -> None:
    """Corrupted captures: same messages, consumed prefix and error for every split; the Tee agrees."""
    raw = (PG / f"{name}.{side}.bin").read_bytes()
    bad = data.draw(mutations(raw))
    chunks = data.draw(chunks_strategy(bad))
    spec = pg_frontend(limit=limit) if side == "fe" else pg_backend(
        answer="ssl" if name == "psql_sslprefer" else None, limit=limit)
    assert_split_invariant(spec, bad, chunks)
    typed = data.draw(mutations(typed_part(name, side)))
    chunks = data.draw(chunks_strategy(typed))
    real = pg_frontend(startup=False, limit=limit) if side == "fe" else pg_backend(limit=limit)
    want = assert_split_invariant(real, typed, chunks)
    got = assert_split_invariant(pg_framer(side, limit=limit), typed, chunks)
    assert (got.consumed, got.error, got.extra[0]) == (want.consumed, want.error, len(want.messages))


# --- The answer to SSLRequest / GSSENCRequest (protocol docs §55.2.10, §55.2.11).


def answer_outcomes(stream: bytes, kind: str = "ssl") -> set[Outcome]:
    """The outcome of every two-chunk split of ``stream`` (and whole, and byte by byte)."""
    spec = pg_backend(answer=kind)
    splits = [[stream], bytewise(stream)] + [cut_at(stream, [k]) for k in range(1, len(stream))]
    return {pump(spec, chunks) for chunks in splits}


def test_ssl_answer_rule_nothing_may_follow_S_or_G_before_the_handshake() -> None:
    """The rule: after 'S' (SSLRequest) or 'G' (GSSENCRequest) the next byte from the
    server must come through TLS/GSS.  A plaintext byte after the answer is refused
    with the same error whether it came in the answer's read or in a later one.

    §55.2.10: "the server is expected to send only the single S byte and then wait
    for the frontend to initiate an SSL handshake. If additional bytes are available
    to read at this point, it likely means that a man-in-the-middle is attempting to
    perform a buffer-stuffing attack (CVE-2021-23222)" — frontends must "treat it as
    a protocol violation".  Before the fix the decoder refused only bytes that
    arrived in the same read: split after 'S', the injected AuthenticationOk was
    decoded as the server's.
    """
    for kind, yes in (("ssl", b"S"), ("gss", b"G")):
        injected = yes + m.encode_auth_ok()
        outcomes = answer_outcomes(injected, kind)
        # One error for every split, and the injected bytes are never decoded.
        assert len({o.error for o in outcomes}) == 1, outcomes
        out = next(iter(outcomes))
        assert out.error[:2] == ("RemoteProtocolError", "unencrypted data after the encryption answer")
        # The answer is returned (and consumed) only when it came alone: a call cannot
        # both return it and raise.  Nothing else is ever consumed.
        assert {(o.messages, o.consumed, o.extra) for o in outcomes} == {
            ((), 0, len(injected)), ((("answer", yes),), 1, len(injected) - 1)}
        # The answer alone is accepted, consumed, and nothing is decoded from it.
        assert answer_outcomes(yes, kind) == {Outcome((("answer", yes),), 1, None, 0)}
    # Once the caller says the TLS/GSS layer is up, the (decrypted) stream decodes as usual.
    dec = BackendDecoder()
    dec.feed(b"S")
    assert dec.read_ssl_answer() == b"S"
    dec.encryption_established()
    dec.feed(m.encode_auth_ok())
    assert dec.next_message().raw == m.encode_auth_ok()


def test_ssl_answer_rule_plaintext_fed_after_S_is_refused_not_buffered() -> None:
    """Split after 'S', the next feed is refused (before the fix it was buffered and
    ``next_message`` decoded it as the server's AuthenticationOk)."""
    dec = BackendDecoder()
    dec.feed(b"S")
    assert dec.read_ssl_answer() == b"S"
    with pytest.raises(RemoteProtocolError, match="unencrypted data after the encryption answer"):
        dec.feed(b"R")
    assert len(dec.buffer) == 0  # refused bytes are not buffered for a later next_message


def test_ssl_answer_N_E_and_invalid_are_split_independent() -> None:
    """'N' continues in plaintext (the bytes after it are the server's next messages,
    libpq does the same); 'E' is left for next_message (the caller must not show it,
    CVE-2024-10977); any other byte is refused.  Every split gives the same outcome."""
    err = m.encode_error("FATAL", "08P01", "unsupported frontend protocol")
    for stream, kind in ((b"N" + m.encode_auth_ok(), "ssl"), (b"N" + m.encode_auth_ok(), "gss"),
                         (err, "ssl"), (err + b"N", "gss"), (b"X" + err, "ssl"), (b"G", "ssl"), (b"S", "gss")):
        outcomes = answer_outcomes(stream, kind)
        assert len(outcomes) == 1, (stream, kind, outcomes)
    (n,) = answer_outcomes(b"N" + m.encode_auth_ok())
    assert n.messages == (("answer", b"N"), ("Message", ord("R"), m.encode_auth_ok())) and n.error is None
    (e,) = answer_outcomes(err)
    assert e.messages == (("answer", b"E"), ("Message", ord("E"), err))
    (x,) = answer_outcomes(b"G")
    assert x.messages == () and "invalid answer byte 0x47" in x.error[1]


# --------------------------------------------------------------------------
# Cassandra (CQL).

CQL = DATA / "cassandra"
CQL_REAL = [("real_v4_lz4", 4, "lz4"), ("real_v4_snappy", 4, "snappy"), ("real_v5_plain", 5, None), ("real_v5_lz4", 5, "lz4")]


def cql_key(frame: F.Frame) -> tuple:
    return (frame.version, frame.flags, frame.stream, frame.opcode, frame.compressed, bytes(frame.raw))


def unwrap_segments(data: bytes, compressed: bool) -> bytes:
    """Reference walk: ``data`` must be whole segments; their payloads, concatenated."""
    pos, out = 0, []
    while pos < len(data):
        header = S.parse_segment_header(data[pos:], compressed)
        assert pos + header.total_size <= len(data), "the consumed span ends inside a segment"
        out.append(bytes(S.decode_payload(data[pos:pos + header.total_size], header)))
        pos += header.total_size
    return b"".join(out)


def cql_span(dec: CqlDecoder, span: bytes, batch: list, state) -> None:
    """Frames mode: span == raw.  Segments: span = whole segments carrying the frames."""
    switch = state.get("switched_at")
    if switch is None or switch[0] != "this batch":
        framing, compression = state["framing_at_start"]
        if framing == "frames":
            assert span == b"".join(bytes(f.raw) for f in batch)
        else:
            assert unwrap_segments(span, compression == "lz4") == b"".join(bytes(f.raw) for f in batch)
    else:
        _, offset, count = switch
        assert span[:offset] == b"".join(bytes(f.raw) for f in batch[:count])
        assert unwrap_segments(span[offset:], dec.compression == "lz4") == b"".join(bytes(f.raw) for f in batch[count:])
    state["framing_at_start"] = (dec.framing, dec.compression)
    state["switched_at"] = None


def cql(direction: str, *, version: int = 4, compression: str | None = None, start: str = "frames",
        switch: bool = False, limit: int = 256 << 20, backend: bool = False) -> Spec:
    """``start``: the framing at the first byte.  ``switch``: change framing where an
    engine does (v5: segments after the client's STARTUP / the server's
    AUTHENTICATE or READY; v4 with compression: the client side compresses after
    STARTUP, the server side from its answer to STARTUP on)."""
    after = {F.Opcode.STARTUP} if direction == "client" else {F.Opcode.AUTHENTICATE, F.Opcode.READY}

    def make():
        dec = CqlBackendDecoder(max_message_size=limit) if backend else CqlDecoder(direction, max_message_size=limit)
        if start == "segments":
            dec.set_framing("segments", compression)
        elif compression and (direction == "server" or not switch):
            dec.set_framing("frames", compression)
        state: dict = {"framing_at_start": (dec.framing, dec.compression), "switched_at": None}

        def step(d):
            msg = d.next_message()
            if msg is NEED_DATA:
                return msg
            state["batch_count"] += 1
            if switch and d.framing == "frames" and msg.opcode in after:
                if version >= 5:
                    d.set_framing("segments", compression)
                    state["switched_at"] = ("this batch", d.buffer.position - state["batch_start"], state["batch_count"])
                elif direction == "client" and compression:
                    d.set_framing("frames", compression)
            return msg

        return dec, step, state

    return Spec(f"cql {direction} {start} {version} {compression}", make, cql_key, cql_span,
                lambda dec, state: (dec.framing, dec.compression, len(dec.buffer)))


def cql_real(side: str, version: int, compression: str | None, **kw) -> Spec:
    """A captured conversation's side, switching framing as the engine does."""
    return cql(side, version=version, compression=compression, switch=True, **kw)


@pytest.mark.parametrize("name,version,compression", CQL_REAL)
@pytest.mark.parametrize("side", ["client", "server"])
def test_cql_real_conversations_every_cut(name: str, version: int, compression: str | None, side: str) -> None:
    data = (CQL / f"{name}.{side}.bin").read_bytes()
    out = check_all_cuts(cql_real(side, version, compression), data)
    assert out.error is None and out.consumed == len(data) and len(out.messages) >= 11
    if side == "server":
        out = check_all_cuts(cql_real(side, version, compression, backend=True), data)
        assert out.error is None and out.consumed == len(data)


# Small saved vectors: (file, direction, start framing, compression).
CQL_VECTORS = [
    ("v3_batch.bin", "client", "frames", None),
    ("v4_startup_lz4.bin", "client", "frames", None),
    ("v4_query_lz4.bin", "client", "frames", "lz4"),
    ("v4_query_snappy.bin", "client", "frames", "snappy"),
    ("v5_execute.bin", "client", "frames", None),
    ("v5_segments_plain.bin", "client", "segments", None),
    ("v5_segments_lz4.bin", "client", "segments", "lz4"),
    ("v5_segments_split.bin", "client", "segments", None),
    ("v2_options.bin", "client", "frames", None),
    ("dse_v2_options.bin", "client", "frames", None),
    ("real_refusal_dse_v2.bin", "server", "frames", None),
    ("real_refusal_response_bit.bin", "server", "frames", None),
    ("real_refusal_response_opcode.bin", "server", "frames", None),
    ("real_refusal_tls_hello.bin", "server", "frames", None),
    ("real_refusal_v6_nobeta.bin", "server", "frames", None),
    ("real_refusal_v7.bin", "server", "frames", None),
]


def test_cql_vectors_listed() -> None:
    listed = {v[0] for v in CQL_VECTORS} | {f"{n}.{s}.bin" for n, *_ in CQL_REAL for s in ("client", "server")}
    assert listed == {p.name for p in CQL.glob("*.bin")}


@pytest.mark.parametrize("name,direction,start,compression", CQL_VECTORS)
def test_cql_vectors_every_cut(name: str, direction: str, start: str, compression: str | None) -> None:
    data = (CQL / name).read_bytes()
    check_all_cuts(cql(direction, start=start, compression=compression), data)


@SPLITS
@given(data=st.data(), conv=st.sampled_from(CQL_REAL), side=st.sampled_from(["client", "server"]))
def test_cql_real_random_splits(data, conv, side: str) -> None:
    name, version, compression = conv
    raw = (CQL / f"{name}.{side}.bin").read_bytes()
    assert_split_invariant(cql_real(side, version, compression), raw, data.draw(chunks_strategy(raw)))


@SPLITS
@given(data=st.data(), conv=st.sampled_from(CQL_REAL), side=st.sampled_from(["client", "server"]),
       limit=st.sampled_from([256 << 20, 100_000, 50]))
def test_cql_real_corrupted_splits(data, conv, side: str, limit: int) -> None:
    name, version, compression = conv
    bad = data.draw(mutations((CQL / f"{name}.{side}.bin").read_bytes()))
    assert_split_invariant(cql_real(side, version, compression, limit=limit, backend=side == "server"),
                           bad, data.draw(chunks_strategy(bad)))


@SPLITS
@given(data=st.data(), vec=st.sampled_from(CQL_VECTORS))
def test_cql_vectors_corrupted_splits(data, vec) -> None:
    name, direction, start, compression = vec
    bad = data.draw(mutations((CQL / name).read_bytes()))
    assert_split_invariant(cql(direction, start=start, compression=compression), bad, data.draw(chunks_strategy(bad)))


@st.composite
def cql_frames(draw, direction: str, version: int, compression: str | None) -> bytes:
    """Frames from the encoder, bodies arbitrary (framing never parses a body)."""
    opcodes = sorted(F.REQUEST_OPCODES if direction == "client" else F.RESPONSE_OPCODES)
    out = []
    for _ in range(draw(st.integers(0, 8))):
        size = draw(st.sampled_from([0, 1, 30, 300, 140_000]))
        body = draw(st.binary(min_size=min(size, 40), max_size=min(size, 40))) * max(1, size // 40) if size else b""
        out.append(F.encode_frame(version, draw(st.sampled_from([0, F.FLAG_TRACING])), draw(st.integers(-1, 32767)),
                                  draw(st.sampled_from(opcodes)), body, response=direction == "server",
                                  compressor=compression if version < 5 else None))
    return b"".join(out)


@SPLITS
@given(data=st.data(), direction=st.sampled_from(["client", "server"]),
       mode=st.sampled_from([(4, "frames", None), (4, "frames", "lz4"), (4, "frames", "snappy"), (3, "frames", None),
                             (5, "segments", None), (5, "segments", "lz4")]),
       corrupt=st.booleans())
def test_cql_generated_splits(data, direction: str, mode, corrupt: bool) -> None:
    version, start, compression = mode
    frames = data.draw(cql_frames(direction, version, compression))
    stream = S.encode_segments(frames, compress=compression == "lz4") if start == "segments" else frames
    if corrupt:
        stream = data.draw(mutations(stream))
    spec = cql(direction, version=version, start=start, compression=compression)
    out = assert_split_invariant(spec, stream, data.draw(chunks_strategy(stream)))
    if not corrupt:
        assert out.error is None and out.consumed == len(stream)
        assert b"".join(x[-1] for x in out.messages) == frames


# --------------------------------------------------------------------------
# MongoDB wire protocol.

MONGO = DATA / "mongo"
MONGO_CAPTURES = sorted(p.name for p in MONGO.glob("*.bin"))


def mongo_key(msg: wire.WireMessage) -> tuple:
    return (msg.length, msg.request_id, msg.response_to, msg.op_code, bytes(msg.raw))


def mongo(*, side: str | None = None, limit: int = wire.DEFAULT_MAX_MESSAGE_SIZE) -> Spec:
    """``side``: wrap in the engine's AttributingDecoder ('client' / 'backend')."""

    def make():
        dec = MongoDecoder(max_message_size=limit)
        if side is not None:
            dec = AttributingDecoder(dec, side)
        return dec, type(dec).next_message, None

    return Spec(f"mongo {side}", make, mongo_key, raw_span, lambda dec, state: len(dec.buffer))


@pytest.mark.parametrize("name", MONGO_CAPTURES)
def test_mongo_captures_every_cut(name: str) -> None:
    data = (MONGO / name).read_bytes()
    for side in (None, "client", "backend"):
        out = check_all_cuts(mongo(side=side), data)
        assert out.error is None and out.consumed == len(data)


@SPLITS
@given(data=st.data(), name=st.sampled_from(MONGO_CAPTURES), side=st.sampled_from([None, "client"]),
       limit=st.sampled_from([wire.DEFAULT_MAX_MESSAGE_SIZE, 100, 16]))
def test_mongo_corrupted_splits(data, name: str, side: str | None, limit: int) -> None:
    raw = (MONGO / name).read_bytes() * 2
    bad = data.draw(mutations(raw))
    assert_split_invariant(mongo(side=side, limit=limit), bad, data.draw(chunks_strategy(bad)))


@st.composite
def mongo_stream(draw) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        doc = {"x": draw(st.text(max_size=20)), "n": draw(st.integers(-5, 5))}
        kind = draw(st.integers(0, 3))
        if kind == 0:
            msg = wire.encode_op_msg(doc, request_id=draw(st.integers(0, 1000)), checksum=draw(st.booleans()))
        elif kind == 1:
            msg = wire.encode_op_query("admin.$cmd", doc, request_id=7)
        elif kind == 2:
            msg = wire.encode_op_reply([doc], request_id=8, response_to=7)
        else:
            inner = wire.encode_op_msg(doc, request_id=9) if draw(st.booleans()) else wire.encode_op_query("a.$cmd", doc, request_id=9)
            msg = wire.compress(inner, draw(st.sampled_from([0, 1, 2, 3])))
        out.append(msg)
    return b"".join(out)


@SPLITS
@given(data=st.data(), corrupt=st.booleans(), side=st.sampled_from([None, "client", "backend"]))
def test_mongo_generated_splits(data, corrupt: bool, side: str | None) -> None:
    stream = data.draw(mongo_stream())
    if corrupt:
        stream = data.draw(mutations(stream))
    out = assert_split_invariant(mongo(side=side), stream, data.draw(chunks_strategy(stream)))
    if not corrupt:
        assert out.error is None and out.consumed == len(stream)


# --------------------------------------------------------------------------
# Arbitrary bytes: any early check a decoder makes on a partial header must agree
# with the check it makes on the whole one.

GARBAGE_SPECS = {
    "pg frontend startup": lambda: pg_frontend(limit=200),
    "pg frontend typed": lambda: pg_frontend(startup=False, limit=200),
    "pg backend": lambda: pg_backend(limit=200),
    "pg backend ssl answer": lambda: pg_backend(answer="ssl", limit=200),
    "pg backend gss answer": lambda: pg_backend(answer="gss", limit=200),
    "pg framer fe": lambda: pg_framer("fe", limit=200),
    "pg framer be": lambda: pg_framer("be", limit=200),
    "cql client frames": lambda: cql("client", limit=200),
    "cql server frames lz4": lambda: cql("server", compression="lz4", limit=200),
    "cql client segments": lambda: cql("client", start="segments", limit=200),
    "cql server segments lz4": lambda: cql("server", start="segments", compression="lz4", limit=200),
    "mongo": lambda: mongo(limit=200),
    "mongo client": lambda: mongo(side="client", limit=200),
    "mongo backend": lambda: mongo(side="backend", limit=200),
}


def plausible_prefix(name: str):
    """A valid-looking first header so garbage gets past the first check now and then."""
    if name.startswith("mongo"):
        return st.tuples(st.integers(-4, 40), st.integers(0, 9), st.sampled_from(sorted(wire.KNOWN_OPCODES) + [0, 5, 99999])).map(
            lambda t: struct.pack("<iiii", t[0], t[1], 0, t[2]))
    if name.startswith("cql"):
        return st.tuples(st.sampled_from([3, 4, 5, 0x84, 0x85, 2, 0x42]), st.integers(0, 255), st.integers(0, 16), st.integers(0, 300)).map(
            lambda t: struct.pack(">BBhBi", t[0], t[1], 0, t[2], t[3]))
    return st.one_of(st.sampled_from([b"S", b"N", b"G", b"E", b"Q", b"R"]), st.integers(-2, 300).map(lambda n: b"Q" + struct.pack(">i", n)),
                     st.integers(-2, 300).map(lambda n: struct.pack(">ii", n, 196608)))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(GARBAGE_SPECS)))
def test_garbage_splits(data, name: str) -> None:
    stream = data.draw(plausible_prefix(name)) + data.draw(st.binary(max_size=80))
    chunks = data.draw(st.one_of(st.just(bytewise(stream)), chunks_strategy(stream)))
    spec = GARBAGE_SPECS[name]()
    whole, got = pump(spec, [stream]), pump(spec, chunks)
    if whole.error and whole.error[1] == "unencrypted data after the encryption answer":
        # The answer rule (test_ssl_answer_rule_*): the same error; the answer byte is
        # returned only if it came alone, nothing behind it ever is.
        assert got.error == whole.error and whole.messages == () and got.messages in ((), (("answer", stream[:1]),))
    else:
        assert got == whole


def every_split(spec: Spec, stream: bytes) -> set[Outcome]:
    splits = [[stream], bytewise(stream)] + [cut_at(stream, [k]) for k in range(1, len(stream))]
    return {pump(spec, chunks) for chunks in splits}


@pytest.mark.parametrize("side", [None, "client", "backend"])
def test_mongo_short_length_is_refused_alike_whatever_the_split(side: str | None) -> None:
    """A messageLength below 16 is refused as such from its first 4 bytes; with the
    whole header in, the decoder used to check the opcode first ('unknown opCode'),
    and the engine read a request header (and answered it) from bytes that are not
    one."""
    for op_code in (0, 0x41414141, wire.OP_MSG, wire.OP_QUERY):
        stream = struct.pack("<iiii", 5, 77, 0, op_code) + b"\x00" * 12
        outcomes = every_split(mongo(side=side), stream)
        assert len(outcomes) == 1, outcomes
        (out,) = outcomes
        assert out.error[1] == "messageLength 5 is smaller than the 16-byte header"
        assert out.error[-1] is None  # no request header to answer


def test_mongo_compressed_too_large_is_answered_alike_whatever_the_split() -> None:
    """An oversized OP_COMPRESSED is refused from its 16-byte header; the engine's
    answer used to follow originalOpcode (OP_QUERY -> OP_REPLY) only when those 4
    bytes happened to arrive in the same read."""
    stream = struct.pack("<iiiii", 500, 31, 0, wire.OP_COMPRESSED, wire.OP_QUERY) + b"\x00" * 60
    outcomes = every_split(mongo(side="client", limit=200), stream)
    assert len(outcomes) == 1, outcomes
    (out,) = outcomes
    assert out.error[0] == "FrameTooLarge" and out.error[-1].request_id == 31
    assert out.error[-1].op_code == wire.OP_MSG
