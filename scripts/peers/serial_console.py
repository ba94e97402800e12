"""A host's serial console on a TCP port: what OpenIPMI's ``ipmi_sim`` relays over Serial-over-LAN.

Strategy: ``ipmi_sim`` takes ``sol "telnet:127.0.0.1:PORT" 115200`` in its
lan.conf and *connects* to PORT as if it were the host's serial port (at its
start, then every 10 s while the connection is down).  This program listens
there and behaves like a login-less shell on a serial line: it echoes each
character it receives (a tty in cooked mode does), ends a line on CR or LF,
answers a few commands and prints a prompt.  In ``telnet:`` mode ipmi_sim
opens with IAC DO/WILL negotiations and doubles 0xFF bytes; both are stripped
here (RFC 854), nothing is negotiated back.

Commands: ``hostname``, ``echo TEXT``, ``whoami``, ``uname``, ``help``,
``flood N`` (N numbered lines, for multi-packet output), ``secret`` (asks
``Password:`` and does not echo the answer — a serial login prompt, to check
that the proxy keeps non-echoed input out of its records), ``hangup`` (closes
the line: the serial side going away).  Anything else: ``CMD: command not
found``.

Everything received is logged, one JSON object per line, to ``console.log``
in the peer's directory — ``{"event": "connect"}``, ``{"line": TEXT}`` per
completed line, ``{"event": "disconnect"}`` — so a test can check what
reached the host.  Single-threaded (``selectors``), stdlib only.

The program runs as our child (``--serve``), its stderr in
``serial_console.err``; its process life is
``scripts.peers.process.PeerProcess``.  Runnable: ``python -m
scripts.peers.serial_console [DIR]`` prints its address and log path as JSON
and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_tcp
from scripts.peers.process import PeerProcess, run_in_foreground

__all__ = ["SerialConsole", "start_serial_console", "HOSTNAME", "PROMPT"]

HOSTNAME = "sol-target-01"
PROMPT = b"serial$ "
BANNER = b"\r\nDebian GNU/Linux 12 " + HOSTNAME.encode() + b" ttyS0\r\n\r\n"

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240


@attrs.define(eq=False)
class SerialConsole(PeerProcess):
    dir: Path
    port: int
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None
    _log_files = ("stderr_file", "log_file")  # log_text: the program's own output

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        """What reached the host, one JSON object per line (``events()``)."""
        return self.dir / "console.log"

    @property
    def stderr_file(self) -> Path:
        return self.dir / "serial_console.err"

    def events(self) -> list[dict]:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def lines(self) -> list[str]:
        """The lines the console received (what was typed at the host), in order."""
        return [e["line"] for e in self.events() if "line" in e]

    def connections(self) -> int:
        return sum(1 for e in self.events() if e.get("event") == "connect")

    def start(self, timeout: float = 10.0) -> "SerialConsole":
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._spawn([sys.executable, "-m", "scripts.peers.serial_console", "--serve", self.host, str(self.port),
                     str(self.log_file)], log=self.stderr_file, env=env, cwd=root, new_session=True)
        # wait_for_tcp's probe connection shows up as a connect/disconnect pair in the log; harmless.
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
        except Exception as exc:
            raise RuntimeError(f"serial console did not start: {exc}\n{self.log_text()}") from None
        return self

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "log": str(self.log_file), "dir": str(self.dir)}


def start_serial_console(directory: Path | str | None = None, port: int | None = None) -> SerialConsole:
    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="dbp-serial-"))
    d.mkdir(parents=True, exist_ok=True)
    return SerialConsole(d, port or free_port()).start()


# -- the program ---------------------------------------------------------------------------


class _Line:
    """One connected "serial line": telnet stripping, echo, line editing, commands."""

    def __init__(self, sock: socket.socket, log) -> None:
        self.sock = sock
        self.log = log
        self.buf = bytearray()
        self.telnet = 0          # 0 data, 1 after IAC, 2 option byte next, 3 in SB, 4 IAC in SB
        self.secret = False      # the next line is a password: no echo
        self.closed = False
        self._last_cr = False
        self.send(BANNER + PROMPT)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data.replace(b"\xff", b"\xff\xff"))
        except OSError:
            self.closed = True

    def record(self, obj: dict) -> None:
        obj["t"] = round(time.time(), 3)
        self.log.write(json.dumps(obj) + "\n")
        self.log.flush()

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.telnet == 0:
                if b == IAC:
                    self.telnet = 1
                else:
                    self.char(b)
            elif self.telnet == 1:
                if b == IAC:
                    self.telnet = 0
                    self.char(b)
                elif b in (DO, DONT, WILL, WONT):
                    self.telnet = 2
                elif b == SB:
                    self.telnet = 3
                else:
                    self.telnet = 0
            elif self.telnet == 2:
                self.telnet = 0
            elif self.telnet == 3:
                if b == IAC:
                    self.telnet = 4
            else:
                self.telnet = 0 if b == SE else 3
            if self.closed:
                return

    def char(self, b: int) -> None:
        if b in (0x0D, 0x0A):
            if b == 0x0A and self._last_cr:     # CR LF (or CR NUL) is one Enter
                self._last_cr = False
                return
            self._last_cr = b == 0x0D
            self.send(b"\r\n")
            self.enter(self.buf.decode("utf-8", "replace"))
            self.buf.clear()
            return
        self._last_cr = False
        if b == 0x00:
            return
        if b in (0x7F, 0x08):
            if self.buf:
                self.buf.pop()
                if not self.secret:
                    self.send(b"\b \b")
            return
        if b == 0x03:                           # ^C: drop the line
            self.buf.clear()
            self.secret = False
            self.send(b"^C\r\n" + PROMPT)
            return
        self.buf.append(b)
        if not self.secret:
            self.send(bytes((b,)))

    def enter(self, line: str) -> None:
        if self.secret:
            self.secret = False
            self.record({"line": line, "secret": True})
            self.send(b"authenticated\r\n" + PROMPT)
            return
        self.record({"line": line})
        cmd, _, arg = line.strip().partition(" ")
        out = b""
        if cmd == "":
            pass
        elif cmd == "hostname":
            out = HOSTNAME.encode() + b"\r\n"
        elif cmd == "echo":
            out = arg.encode() + b"\r\n"
        elif cmd == "whoami":
            out = b"root\r\n"
        elif cmd == "uname":
            out = b"Linux\r\n"
        elif cmd == "help":
            out = b"commands: hostname echo whoami uname flood secret hangup help\r\n"
        elif cmd == "flood":
            n = int(arg) if arg.strip().isdigit() else 10
            out = b"".join(b"line %05d of the flood %s\r\n" % (i, HOSTNAME.encode()) for i in range(1, min(n, 10000) + 1))
        elif cmd == "secret":
            self.secret = True
            self.send(b"Password: ")
            return
        elif cmd == "hangup":
            self.send(b"hanging up\r\n")
            self.closed = True
            return
        else:
            out = cmd.encode() + b": command not found\r\n"
        self.send(out + PROMPT)


def serve(host: str, port: int, log_path: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.create_server((host, port), reuse_port=False)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    with open(log_path, "a", encoding="utf-8") as log:
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    try:
                        conn, _addr = listener.accept()
                    except OSError:
                        continue
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    line = _Line(conn, log)
                    line.record({"event": "connect"})
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, line)
                    continue
                line = key.data
                try:
                    data = line.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    line.sock.setblocking(True)   # sendall of a flood; reads stay event-driven
                    line.feed(data)
                    line.sock.setblocking(False)
                if not data or line.closed:
                    sel.unregister(line.sock)
                    line.sock.close()
                    line.record({"event": "disconnect"})


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve(argv[1], int(argv[2]), argv[3])
        return
    run_in_foreground(start_serial_console, argv[0] if argv else None, prefix="dbp-serial-")


if __name__ == "__main__":
    main(sys.argv[1:])
