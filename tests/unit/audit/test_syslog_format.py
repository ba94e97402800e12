"""RFC 5424 formatting and RFC 6587 octet-counting framing of audit events.

Messages are checked against a parser written from the RFC 5424 §6 ABNF
(HEADER, STRUCTURED-DATA with §6.3.3 escaping, MSG), and the JSON body must
give back the exact event (so a SIEM can recompute the hash chain).  The
integration tests add what a real parser (rsyslog's) makes of them.
"""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import chain_hash
from dbproxy.audit.sinks.syslog import FACILITIES, UTF8_BOM, Rfc5424Formatter, octet_frame, sd_escape, sd_name

HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
)
TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")


def parse_sd(data: bytes) -> tuple[list[tuple[str, dict[str, str]]], bytes]:
    """STRUCTURED-DATA per RFC 5424 §6.3: returns the elements and the rest (after one SP)."""
    if data.startswith(b"- "):
        return [], data[2:]
    elements = []
    i = 0
    while i < len(data) and data[i : i + 1] == b"[":
        j = i + 1
        m = re.match(rb'[!-~]+?(?=[ \]])', data[j:])
        assert m, data[i:]
        sd_id = m.group().decode()
        assert not set(sd_id) & set('= ]"'), sd_id
        j += len(m.group())
        params: dict[str, str] = {}
        while data[j : j + 1] == b" ":
            j += 1
            eq = data.index(b"=", j)
            name = data[j:eq].decode()
            assert 1 <= len(name) <= 32 and not set(name) & set('= ]"'), name
            assert data[eq + 1 : eq + 2] == b'"'
            k = eq + 2
            value = bytearray()
            while True:
                c = data[k : k + 1]
                assert c, "unterminated PARAM-VALUE"
                if c == b"\\" and data[k + 1 : k + 2] in (b'"', b"\\", b"]"):
                    value += data[k + 1 : k + 2]
                    k += 2
                    continue
                if c == b'"':
                    break
                assert c != b"]", "unescaped ] in PARAM-VALUE"
                value += c
                k += 1
            params[name] = value.decode()
            j = k + 1
        assert data[j : j + 1] == b"]", data[j:]
        elements.append((sd_id, params))
        i = j + 1
    assert data[i : i + 1] == b" ", "SP after STRUCTURED-DATA"
    return elements, data[i + 1 :]


def parse(message: bytes) -> dict:
    m = HEADER.match(message)
    assert m, message[:120]
    sd, msg = parse_sd(message[m.end() :])
    out = {k: v.decode() for k, v in m.groupdict().items()}
    out["pri"] = int(out["pri"])
    out["sd"] = sd
    out["msg"] = msg
    return out


def sample_event(**extra) -> dict:
    event = {
        "event": ev.QUERY,
        "code": ev.CODES[ev.QUERY],
        "uid": "0123456789abcdef0123456789abcdef",
        "time": "2024-05-01T10:00:00.123456Z",
        "sid": "feedfacefeedfacefeedfacefeedface",
        "user": "alice",
        "roles": ["dba"],
        "db_protocol": "postgres",
        "db_name": "app",
        "db_user": "u_scram",
        "addr.remote": "127.0.0.1:50000",
        "db_query": 'SELECT "x]y" FROM t WHERE a = \'\\\' -- ünïcödé',
        "seq": 42,
        "prev_hash": "a" * 64,
    }
    event.update(extra)
    event["hash"] = chain_hash(event)
    return event


def fmt(**kw) -> Rfc5424Formatter:
    kw.setdefault("hostname", "proxy1.example")
    kw.setdefault("procid", "4242")
    return Rfc5424Formatter(**kw)


def test_json_body_header_and_index_sd():
    event = sample_event()
    msg = fmt().format(event)
    p = parse(msg)
    assert p["pri"] == FACILITIES["authpriv"] * 8 + 6
    assert p["ts"] == "2024-05-01T10:00:00.123456Z" and TS.match(p["ts"])
    assert (p["host"], p["app"], p["procid"], p["msgid"]) == ("proxy1.example", "dbproxy", "4242", "TDB02I")
    [(sd_id, params)] = p["sd"]
    assert sd_id == "dbproxy@32473"
    assert params == {"seq": "42", "uid": event["uid"], "event": ev.QUERY, "sid": event["sid"], "user": "alice"}
    body = orjson.loads(p["msg"])
    assert body == event
    assert chain_hash(body) == event["hash"]


def test_failure_is_warning_and_facility_configurable():
    event = sample_event(event=ev.RESULT, code=ev.CODES[ev.RESULT], success=False, error="boom")
    p = parse(fmt(facility=FACILITIES["local3"]).format(event))
    assert p["pri"] == 19 * 8 + 4
    loss = sample_event(event=ev.AUDIT_LOSS, code=ev.CODES[ev.AUDIT_LOSS])
    assert parse(fmt().format(loss))["pri"] % 8 == 4


def test_structured_body_escapes_and_keeps_every_field():
    event = sample_event(db_query_parameters=["a]b", None, 'q"uote'], success=True, affected_records=3, nothing=None)
    p = parse(fmt(body="structured").format(event))
    [(sd_id, params)] = p["sd"]
    assert params["db_query"] == event["db_query"]  # ", \ and ] survive the §6.3.3 escaping
    assert params["addr.remote"] == "127.0.0.1:50000"
    assert params["success"] == "true" and params["affected_records"] == "3"
    assert orjson.loads(params["db_query_parameters"]) == ["a]b", None, 'q"uote']
    assert orjson.loads(params["roles"]) == ["dba"]
    assert "nothing" not in params
    assert params["hash"] == event["hash"] and params["seq"] == "42"
    text = p["msg"].decode()
    assert text.startswith("#42 alice feedface QUERY u_scram@app:") and "\n" not in text


def test_header_fields_are_printusascii_and_cut_to_their_limits():
    event = sample_event(code="", event="x" * 60)
    p = parse(fmt(hostname="h o\tst" + "x" * 300, app_name="an app " + "y" * 60, procid="").format(event))
    assert p["host"].startswith("h_o_st") and len(p["host"]) == 255
    assert p["app"].startswith("an_app_") and len(p["app"]) == 48
    assert p["procid"] == "-"
    assert p["msgid"] == "x" * 32


def test_utf8_bom_option():
    event = sample_event()
    p = parse(fmt(utf8_bom=True).format(event))
    assert p["msg"].startswith(UTF8_BOM)
    assert orjson.loads(p["msg"][3:]) == event


def test_sd_name_and_escape():
    assert sd_name('a=b c]d"e') == "a_b_c_d_e"
    assert sd_name("k" * 40) == "k" * 32
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'


def test_octet_counting_frames_by_bytes_not_characters():
    message = fmt().format(sample_event())
    framed = octet_frame(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(message) == len(rest) and rest == message
    assert len(message) != len(message.decode())  # the query has non-ASCII characters


def split_octet_frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        length, _, data = data.partition(b" ")
        n = int(length)
        out.append(data[:n])
        data = data[n:]
    return out


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=40), st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(), st.lists(st.text(), max_size=3)), max_size=8))
def test_any_event_formats_to_valid_5424_and_round_trips(extra):
    event = sample_event(**{k: v for k, v in extra.items() if k not in ("hash", "seq", "prev_hash", "time", "code", "event")})
    for body in ("json", "structured"):
        message = fmt(body=body).format(event)
        p = parse(message)
        if body == "json":
            assert orjson.loads(p["msg"]) == event
    frames = split_octet_frames(octet_frame(message) + octet_frame(message))
    assert frames == [message, message]


@pytest.mark.parametrize("value,expected", [("authpriv", 10), ("local7", 23), ("auth", 4)])
def test_facility_names(value, expected):
    assert FACILITIES[value] == expected
