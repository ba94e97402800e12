"""Parsers on captured PostgreSQL messages, and encoders round-tripped through the decoders."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dbproxy.errors import RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import BackendDecoder, FrontendDecoder

DATA = Path(__file__).resolve().parents[2] / "data" / "postgres"


def frontend(name: str) -> list:
    dec = FrontendDecoder()
    dec.feed((DATA / f"{name}.fe.bin").read_bytes())
    out = []
    while (msg := dec.next_message()) is not NEED_DATA:
        out.append(msg)
    return out


def backend(name: str, ssl: bool = False) -> list:
    dec = BackendDecoder()
    dec.feed((DATA / f"{name}.be.bin").read_bytes())
    if ssl:
        assert dec.read_ssl_answer() == b"N"
    out = []
    while (msg := dec.next_message()) is not NEED_DATA:
        out.append(msg)
    return out


def of_type(msgs: list, t: int) -> list:
    return [x for x in msgs if x.type == t]


def one(data: bytes, decoder=None):
    dec = decoder or BackendDecoder()
    dec.feed(data)
    msg = dec.next_message()
    assert dec.next_message() is NEED_DATA and len(dec.buffer) == 0
    assert msg.raw == data
    return msg


# --------------------------------------------------------------------------
# Captured frontend messages.


def test_startup_message_params() -> None:
    msg = frontend("psql_simple")[0]
    assert isinstance(msg, m.StartupMessage)
    assert msg.protocol == m.PROTOCOL_3_0
    assert msg.params == {"user": "scram_user", "database": "postgres", "application_name": "capture"}
    assert m.encode_startup(msg.params) == msg.raw


def test_simple_queries() -> None:
    queries = [m.parse_query(x) for x in of_type(frontend("psql_simple"), m.FE.QUERY)]
    assert queries[0] == "select 1 as one, 'x' as two, null as three"
    assert "select 1/0" in queries and "" in queries
    raws = [x.raw for x in of_type(frontend("psql_simple"), m.FE.QUERY)]
    assert [m.encode_query(q) for q in queries] == raws


def test_sasl_initial_and_response_from_libpq() -> None:
    msgs = frontend("psql_simple")
    init = m.parse_sasl_initial_response(msgs[1])
    assert init.mechanism == "SCRAM-SHA-256"
    assert init.data is not None and init.data.startswith(b"n,,n=,r=")
    assert m.encode_sasl_initial(init.mechanism, init.data) == msgs[1].raw
    final = m.parse_sasl_response(msgs[2])
    assert final.startswith(b"c=biws,r=") and b",p=" in final
    assert m.encode_sasl_response(final) == msgs[2].raw


def test_extended_query_messages() -> None:
    msgs = frontend("psycopg_extended")
    parses = [m.parse_parse(x) for x in of_type(msgs, m.FE.PARSE)]
    assert parses[0] == m.Parse("", "insert into e values ($1, $2)", (21, 0))  # int2, unspecified
    assert parses[1] == m.Parse("_pg3_0", "insert into e values ($1, $2)", (21, 0))
    assert parses[2].query == "select a, b from e where a > $1 order by a"
    assert parses[3].query == "select $1::int / 0"

    binds = [m.parse_bind(x) for x in of_type(msgs, m.FE.BIND)]
    assert binds[0] == m.Bind("", "", (1, 0), (b"\x00\x01", "hé".encode()), (0,))
    assert binds[1].statement == "_pg3_0"
    assert binds[1].params == (b"\x00\x02", None)
    assert binds[1].param_format(0) == 1 and binds[1].param_format(1) == 0
    assert binds[2].result_formats == (1,)  # binary=True
    assert [b.params for b in binds[3:5]] == [(b"\x00\x03", b"x"), (b"\x00\x04", b"y")]

    execs = [m.parse_execute(x) for x in of_type(msgs, m.FE.EXECUTE)]
    assert execs and all(e == m.Execute("", 0) for e in execs)
    describes = [m.parse_describe(x) for x in of_type(msgs, m.FE.DESCRIBE)]
    assert describes and all(d == m.DescribeOrClose("P", "") for d in describes)


def test_copy_data_frontend() -> None:
    msgs = frontend("psycopg_copy")
    (cd,) = of_type(msgs, m.FE.COPY_DATA)
    rows = m.parse_copy_data(cd).decode().splitlines()
    assert rows[0] == "0\trow0" and len(rows) == 10


def test_md5_password_message() -> None:
    pw = m.parse_password(frontend("psycopg_md5")[1])
    assert pw.startswith(b"md5") and len(pw) == 35


# --------------------------------------------------------------------------
# Captured backend messages.


def test_authentication_messages() -> None:
    msgs = backend("psql_simple")
    auths = [m.parse_authentication(x) for x in of_type(msgs, m.BE.AUTHENTICATION)]
    assert [a.subtype for a in auths] == [m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL, m.AUTH_OK]
    assert m.sasl_mechanisms(auths[0].data) == ["SCRAM-SHA-256"]
    assert auths[1].data.startswith(b"r=") and b",s=" in auths[1].data and b",i=" in auths[1].data
    assert auths[2].data.startswith(b"v=")
    assert m.encode_auth_sasl(["SCRAM-SHA-256"]) == msgs[0].raw
    assert m.encode_auth_sasl_continue(auths[1].data) == msgs[1].raw
    assert m.encode_auth_sasl_final(auths[2].data) == msgs[2].raw
    assert m.encode_auth_ok() == msgs[3].raw
    md5 = m.parse_authentication(backend("psycopg_md5")[0])
    assert md5.subtype == m.AUTH_MD5_PASSWORD and len(md5.data) == 4
    assert m.encode_auth_md5(md5.data) == backend("psycopg_md5")[0].raw


def test_parameter_status_and_key_data() -> None:
    msgs = backend("psql_simple")
    params = dict(m.parse_parameter_status(x) for x in of_type(msgs, m.BE.PARAMETER_STATUS))
    assert params["server_encoding"] == "UTF8"
    assert params["server_version"].startswith("15")
    assert params["application_name"] == "capture"
    for x in of_type(msgs, m.BE.PARAMETER_STATUS):
        assert m.encode_parameter_status(*m.parse_parameter_status(x)) == x.raw
    (k,) = of_type(msgs, m.BE.BACKEND_KEY_DATA)
    key = m.parse_backend_key_data(k)
    assert key.pid > 0 and len(key.secret) == 4
    assert m.encode_backend_key_data(key.pid, key.secret) == k.raw
    assert m.encode_backend_key_data(key.pid, struct.unpack(">i", key.secret)[0]) == k.raw


def test_command_tags_and_row_counts() -> None:
    tags = [m.parse_command_complete(x) for x in of_type(backend("psql_simple"), m.BE.COMMAND_COMPLETE)]
    assert tags[:6] == ["SELECT 1", "CREATE TABLE", "INSERT 0 3", "UPDATE 2", "DELETE 1", "DO"]
    assert [m.rows_from_tag(t) for t in tags[:6]] == [1, None, 3, 2, 1, None]
    copy_tags = [m.parse_command_complete(x) for x in of_type(backend("psycopg_copy"), m.BE.COMMAND_COMPLETE)]
    assert copy_tags[1:] == ["COPY 10", "COPY 10"]
    assert m.rows_from_tag("COPY 10") == 10
    for t in tags:
        assert m.parse_command_complete(m.Message(m.BE.COMMAND_COMPLETE, m.encode_command_complete(t))) == t


@pytest.mark.parametrize("tag,rows", [
    ("INSERT 0 5", 5), ("UPDATE 3", 3), ("SELECT 7", 7), ("COPY 10", 10), ("DELETE 0", 0),
    ("MERGE 4", 4), ("FETCH 2", 2), ("MOVE 9", 9), ("CREATE TABLE", None), ("BEGIN", None),
    ("SELECT", None), ("", None), ("INSERT 0 x", None),
])
def test_rows_from_tag(tag: str, rows: int | None) -> None:
    assert m.rows_from_tag(tag) == rows


def test_error_notice_and_notification() -> None:
    msgs = backend("psql_simple")
    (err,) = of_type(msgs, m.BE.ERROR_RESPONSE)
    f = m.parse_error_fields(err)
    assert (f["S"], f["V"], f["C"], f["M"]) == ("ERROR", "ERROR", "22012", "division by zero")
    (notice,) = of_type(msgs, m.BE.NOTICE_RESPONSE)
    nf = m.parse_notice_fields(notice)
    assert (nf["S"], nf["C"], nf["M"]) == ("NOTICE", "00000", "hello notice")
    assert "PL/pgSQL" in nf["W"]
    (note,) = of_type(msgs, m.BE.NOTIFICATION_RESPONSE)
    n = m.parse_notification(note)
    assert (n.channel, n.payload) == ("chan", "payload-1")
    key = m.parse_backend_key_data(of_type(msgs, m.BE.BACKEND_KEY_DATA)[0])
    assert n.pid == key.pid  # a session's own NOTIFY comes from its own backend


def test_fatal_auth_error() -> None:
    (err,) = backend("psql_badpw")[2:]
    f = m.parse_error_fields(err)
    assert (f["S"], f["C"]) == ("FATAL", "28P01")
    assert 'password authentication failed for user "scram_user"' == f["M"]


def test_ready_for_query_status() -> None:
    statuses = [m.parse_ready_for_query(x) for x in of_type(backend("psql_simple"), m.BE.READY_FOR_QUERY)]
    assert statuses[0] == "I" and statuses[-1] == "T"
    assert set(statuses) == {"I", "T"}
    assert {m.parse_ready_for_query(x) for x in of_type(backend("psycopg_md5"), m.BE.READY_FOR_QUERY)} == {"I", "T"}


def test_ssl_prefer_capture() -> None:
    fe = frontend("psql_sslprefer")
    assert isinstance(fe[0], m.SSLRequest) and fe[0].raw == m.encode_ssl_request()
    assert isinstance(fe[1], m.StartupMessage)
    be = backend("psql_sslprefer", ssl=True)
    assert be[0].type == m.BE.AUTHENTICATION


# --------------------------------------------------------------------------
# Encoders through the decoders.


def test_encode_error_roundtrip() -> None:
    raw = m.encode_error("FATAL", "28000", "access denied by proxy policy", detail="d", hint="h")
    f = m.parse_error_fields(one(raw))
    assert f == {"S": "FATAL", "V": "FATAL", "C": "28000", "M": "access denied by proxy policy", "D": "d", "H": "h"}
    raw = m.encode_notice("WARNING", "01000", "audited")
    msg = one(raw)
    assert msg.type == m.BE.NOTICE_RESPONSE
    assert m.parse_error_fields(msg) == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "audited"}


def test_encode_error_rejects_nul() -> None:
    with pytest.raises(ValueError):
        m.encode_error("ERROR", "XX000", "bad\0message")


def test_encode_backend_side_roundtrip() -> None:
    assert m.parse_ready_for_query(one(m.encode_ready_for_query("T"))) == "T"
    assert m.parse_ready_for_query(one(m.encode_ready_for_query(b"E"))) == "E"
    with pytest.raises(ValueError):
        m.encode_ready_for_query("X")
    assert m.parse_authentication(one(m.encode_auth_cleartext())) == m.Authentication(m.AUTH_CLEARTEXT_PASSWORD, b"")
    assert m.parse_authentication(one(m.encode_auth_md5(b"abcd"))) == m.Authentication(m.AUTH_MD5_PASSWORD, b"abcd")
    a = m.parse_authentication(one(m.encode_auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])))
    assert m.sasl_mechanisms(a.data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert m.parse_authentication(one(m.encode_auth_request(m.AUTH_GSS_CONTINUE, b"tok"))).data == b"tok"
    k = m.parse_backend_key_data(one(m.encode_backend_key_data(42, b"\x01\x02\x03\x04")))
    assert k == m.BackendKeyData(42, b"\x01\x02\x03\x04")
    assert m.parse_parameter_status(one(m.encode_parameter_status("TimeZone", "UTC"))) == ("TimeZone", "UTC")
    npv = m.parse_negotiate_protocol_version(one(m.encode_negotiate_protocol_version(0, ["_pq_.x", "_pq_.y"])))
    assert npv == m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ("_pq_.x", "_pq_.y"))
    assert one(m.encode_empty_query_response()).type == m.BE.EMPTY_QUERY_RESPONSE


def test_encode_frontend_side_roundtrip() -> None:
    fe = lambda: FrontendDecoder(startup=False)  # noqa: E731
    assert m.parse_password(one(m.encode_password("s3cret"), fe())) == b"s3cret"
    assert m.parse_sasl_initial_response(one(m.encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=x"), fe())) == \
        m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x")
    no_data = one(m.encode_sasl_initial("X", None), fe())
    assert m.parse_sasl_initial_response(no_data) == m.SASLInitialResponse("X", None)
    assert m.parse_sasl_response(one(m.encode_sasl_response(b"c=biws"), fe())) == b"c=biws"
    assert m.parse_gss_response(one(m.encode_gss_response(b"\x60\x01"), fe())) == b"\x60\x01"
    assert m.parse_query(one(m.encode_query("select 'é'"), fe())) == "select 'é'"
    assert one(m.encode_terminate(), fe()).type == m.FE.TERMINATE
    assert one(m.encode_sync(), fe()).type == m.FE.SYNC


def test_encode_startup_phase_roundtrip() -> None:
    st = one(m.encode_startup({"user": "alice", "database": "db", "options": "-c x=1"}), FrontendDecoder())
    assert st.params == {"user": "alice", "database": "db", "options": "-c x=1"}
    assert isinstance(one(m.encode_ssl_request(), FrontendDecoder()), m.SSLRequest)
    assert isinstance(one(m.encode_gssenc_request(), FrontendDecoder()), m.GSSENCRequest)
    c = one(m.encode_cancel_request(1234, 0x01020304), FrontendDecoder())
    assert (c.pid, c.secret) == (1234, b"\x01\x02\x03\x04")


@pytest.mark.parametrize("parser,body", [
    (m.parse_query, b"no terminator"),
    (m.parse_parse, b"s\0q\0\x00\x02\x00\x00\x00\x17"),          # 2 types announced, 1 present
    (m.parse_bind, b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09ab"),    # value shorter than its length
    (m.parse_bind, b"\0\0\x00\x00\xff\xff"),                       # negative parameter count
    (m.parse_execute, b"portal\0\x00"),
    (m.parse_error_fields, b"SERROR\0CXX000"),
    (m.parse_backend_key_data, b"\x00\x00\x00\x01\x00"),
    (m.parse_ready_for_query, b""),
    (m.parse_negotiate_protocol_version, b"\x00\x03\x00\x00\x00\x00\x00\x02a\0"),
    (m.parse_sasl_initial_response, b"SCRAM\0\x00\x00\x00\x10abc"),
    (m.parse_notification, b"\x00\x00\x00\x01chan"),
])
def test_malformed_bodies(parser, body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parser(m.Message(0x78, m.encode_message("x", body)))


def test_message_accessors() -> None:
    msg = one(m.encode_query("x"), FrontendDecoder(startup=False))
    assert (msg.type_char, msg.body) == ("Q", b"x\0")
