"""The PostgreSQL table sink's COPY data (audit.sinks.postgres.copy_text): one text-format row a line."""

from __future__ import annotations

import orjson

from dbproxy.audit.sinks.postgres import copy_text


def _copy_rows(data: bytes) -> list[bytes]:
    """Read COPY text-format rows of one column back (the escapes copy_text uses, as PostgreSQL reads them)."""
    assert data.endswith(b"\n")
    unescape = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
    rows = []
    for row in data[:-1].split(b"\n"):
        out, i = bytearray(), 0
        while i < len(row):
            if row[i:i + 1] == b"\\":
                out += unescape[row[i + 1:i + 2]]
                i += 2
            else:
                out += row[i:i + 1]
                i += 1
        rows.append(bytes(out))
    return rows


def test_json_lines_round_trip_and_are_escaped_at_once():
    lines = [orjson.dumps({"seq": i, "q": v}) for i, v in enumerate(["C:\\x", "a\tb", "l1\nl2", "\\.", "\\N", "ü"])]
    data = copy_text(lines)
    assert data.count(b"\n") == len(lines) and b"\t" not in data
    assert _copy_rows(data) == lines


def test_a_payload_with_a_raw_newline_or_tab_is_escaped_alone():
    payloads = [b"plain", b"raw\nnewline", b"raw\ttab\r", b"back\\slash"]
    data = copy_text(payloads)
    assert data.count(b"\n") == len(payloads)
    assert _copy_rows(data) == payloads


def test_nothing_is_no_rows():
    assert copy_text([]) == b""
