"""``engines/vnc/recording.py``: the desktop recording file (write, read back, truncation, hash)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dbproxy.engines.vnc import recording as R
from dbproxy.engines.vnc.recording import DesktopRecorder, is_recording, parse_recording, read_recording
from dbproxy.engines.vnc.updates import PixelFormat

PF = PixelFormat().encode()
ROOT = Path(__file__).resolve().parents[3]


def make(path: Path, chunks: list[tuple[str, bytes]], **kw) -> str:
    rec = DesktopRecorder(str(path), width=640, height=480, pixel_format=PF, name="desk ü", **kw)
    for kind, data in chunks:
        (rec.server if kind == "s" else rec.client)(data)
    return rec.close()


CHUNKS = [("s", b"\x00\x00\x00\x01" + bytes(range(256)) * 40), ("c", b"\x03\x01\x00\x00\x00\x00\x02\x80\x01\xe0"),
          ("s", b"\x02"), ("c", b"\x04\x01\x00\x00\x00\x00\x00\x61"), ("s", os.urandom(5000))]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.vncrec"
    digest = make(path, CHUNKS)
    rec = read_recording(str(path))
    assert [(k, d) for _, k, d in rec.events] == CHUNKS
    times = [t for t, _, _ in rec.events]
    assert times == sorted(times) and times[0] >= 0
    assert rec.width == 640 and rec.height == 480 and rec.pixel_format == PF
    assert rec.header["name"] == "desk ü" and rec.header["compression"] == "zstd"
    assert not rec.truncated
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert is_recording(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Compressed: the repetitive first chunk shrinks.
    assert path.stat().st_size < sum(len(d) for _, d in CHUNKS)


def test_close_is_idempotent_and_fields(tmp_path: Path) -> None:
    rec = DesktopRecorder(str(tmp_path / "a.vncrec"), width=1, height=1, pixel_format=PF, name="")
    rec.server(b"abc")
    first = rec.close()
    assert rec.close() == first
    rec.server(b"after close is ignored")
    f = rec.fields()
    assert f == {"recording": "a.vncrec", "recording_bytes": (tmp_path / "a.vncrec").stat().st_size,
                 "recording_sha256": first}


def test_timestamps_are_monotonic_from_open(tmp_path: Path, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    rec = DesktopRecorder(str(tmp_path / "t.vncrec"), width=1, height=1, pixel_format=PF, name="")
    clock[0] += 0.25
    rec.server(b"a")
    clock[0] += 1.5
    rec.client(b"b")
    rec.close()
    assert [t for t, _, _ in read_recording(str(tmp_path / "t.vncrec")).events] == [0.25, 1.75]


def test_existing_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "x.vncrec"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        DesktopRecorder(str(path), width=1, height=1, pixel_format=PF, name="")
    assert path.read_bytes() == b"keep"


def test_every_truncation_reads_a_prefix(tmp_path: Path) -> None:
    """Cut a finished file at every byte: the reader never fails past the header and returns whole
    records that are a prefix of the real ones, flagged truncated."""
    path = tmp_path / "f.vncrec"
    rec = DesktopRecorder(str(path), width=8, height=8, pixel_format=PF, name="n")
    for kind, data in CHUNKS:
        (rec.server if kind == "s" else rec.client)(data)
        rec.flush()  # a block per record: every record becomes recoverable on its own
    rec.close()
    blob = path.read_bytes()
    full = parse_recording(blob).events
    header_end = len(R.MAGIC) + 6 + int.from_bytes(blob[len(R.MAGIC) + 2:len(R.MAGIC) + 6], "big")
    seen = set()
    for cut in range(header_end, len(blob)):
        got = parse_recording(blob[:cut])
        assert got.truncated, cut
        assert got.events == full[:len(got.events)], cut
        seen.add(len(got.events))
    assert seen == set(range(len(full) + 1))  # each record appears as soon as its block is complete
    for cut in range(0, header_end):
        with pytest.raises(ValueError):
            parse_recording(blob[:cut])


def test_crash_leaves_a_readable_prefix(tmp_path: Path) -> None:
    """A process that dies without closing (os._exit: no finally, no buffered flush) leaves every
    record written before the last periodic flush."""
    path = tmp_path / "crash.vncrec"
    code = textwrap.dedent(f"""
        import os, time
        from dbproxy.engines.vnc import recording as R
        rec = R.DesktopRecorder({str(path)!r}, width=4, height=4, pixel_format=bytes(16), name="c")
        for i in range(50):
            rec.server(bytes([i]) * 1000)
        R.FLUSH_SECONDS = 0.0   # the next record triggers the periodic flush
        rec.client(b"last before the crash")
        R.FLUSH_SECONDS = 1e9
        rec.server(b"lost: after the flush, still in the buffers")
        os._exit(9)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 9
    rec = read_recording(str(path))
    assert rec.truncated
    assert [d for _, _, d in rec.events] == [bytes([i]) * 1000 for i in range(50)] + [b"last before the crash"]


def test_periodic_flush_reaches_the_file(tmp_path: Path, monkeypatch) -> None:
    """While the session runs, the file on disk grows to hold what was recorded a second ago."""
    clock = [50.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    path = tmp_path / "live.vncrec"
    rec = DesktopRecorder(str(path), width=1, height=1, pixel_format=PF, name="")
    rec.server(b"early")
    assert read_recording(str(path)).events == []  # still in the compressor / file buffers
    clock[0] += R.FLUSH_SECONDS
    rec.server(b"a second later")
    assert [d for _, _, d in read_recording(str(path)).events] == [b"early", b"a second later"]
    rec.close()


def test_not_a_recording(tmp_path: Path) -> None:
    p = tmp_path / "n.cast"
    p.write_text('{"version": 2}\n')
    with pytest.raises(ValueError, match="not a desktop recording"):
        read_recording(str(p))
    assert not is_recording(str(p))
    good = tmp_path / "g.vncrec"
    make(good, [])
    blob = bytearray(good.read_bytes())
    blob[len(R.MAGIC) + 1] = 9
    with pytest.raises(ValueError, match="version 9, this dbproxy reads version 1"):
        parse_recording(bytes(blob))
    with pytest.raises(ValueError, match="16-byte PIXEL_FORMAT"):
        DesktopRecorder(str(tmp_path / "z.vncrec"), width=1, height=1, pixel_format=b"x", name="")
