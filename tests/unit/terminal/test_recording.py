"""Asciicast v2 writing and reading, and the replay's final screen (dbproxy.terminal.recording / replay)."""

from __future__ import annotations

import hashlib

import pytest

from dbproxy.terminal.recording import AsciicastWriter, read_cast
from dbproxy.terminal.replay import schedule, screen_text


def test_written_file_reads_back_with_its_hash(tmp_path):
    path = tmp_path / "s.cast"
    w = AsciicastWriter(str(path), 20, 5, "xterm")
    w.output("h€".encode()[:2])  # a character split across packets
    w.output("h€".encode()[2:] + b"\r\nline2")
    w.resize(30, 6)
    fields = w.close()
    data = path.read_bytes()
    assert fields["recording_sha256"] == hashlib.sha256(data).hexdigest() and fields["recording_bytes"] == len(data)
    header, events = read_cast(str(path))
    assert header["width"] == 20 and header["env"] == {"TERM": "xterm"}
    assert "".join(d for _, c, d in events if c == "o") == "h€\r\nline2"
    assert screen_text(header, events) == ["h€", "line2"]


def test_input_file_uses_the_input_code(tmp_path):
    w = AsciicastWriter(str(tmp_path / "i.cast"), 80, 24, None, kind="i")
    w.output(b"ls\r")
    w.close()
    _, events = read_cast(str(tmp_path / "i.cast"))
    assert [(c, d) for _, c, d in events] == [("i", "ls\r")]


def test_final_screen_follows_cursor_moves_and_resizes():
    header = {"version": 2, "width": 10, "height": 3}
    events = [(0.1, "o", "abc\r\ndef"), (0.2, "o", "\x1b[1;2HX"), (0.3, "r", "12x3"),
              (0.4, "o", "\x1b[3;1H0123456789ab")]
    assert screen_text(header, events) == ["aXc", "def", "0123456789ab"]
    assert screen_text(header, events, until=0.15) == ["abc", "def"]


def test_schedule_speed_seek_and_idle_limit():
    events = [(1.0, "o", "a"), (3.0, "o", "b"), (13.0, "o", "c"), (13.5, "i", "k")]
    assert list(schedule(events, speed=2)) == [(0.5, "o", "a"), (1.0, "o", "b"), (5.0, "o", "c")]
    assert list(schedule(events, seek=3.0, idle_limit=2)) == [(0.0, "o", "a"), (0.0, "o", "b"), (2.0, "o", "c")]


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (b'{"version": 1}\n', "not an asciicast v2 header"),
    (b'{"version": 2}\n[1, "o"]\n', "line 2: expected [seconds, code, data]"),
    (b'{"version": 2}\nnope\n', "line 2: not JSON"),
])
def test_not_an_asciicast_is_refused_with_the_line(tmp_path, content, problem):
    path = tmp_path / "bad.cast"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        read_cast(str(path))
