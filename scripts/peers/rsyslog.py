"""A private rsyslog (the Debian package) as the test SIEM for the syslog audit sink.

Strategy: ``rsyslogd -n -f CONF -i PIDFILE`` as our child process, with a
config of our own (never /etc/rsyslog.conf) under a directory the caller owns:

    tcp  — imtcp, plain TCP; RFC 6587 octet-counted framing is recognised
           per message (and LF framing as fallback)
    tls  — imtcp with the gtls driver (rsyslog-gnutls), server cert from the
           throwaway CA of ``certs.py``; clients verify it, rsyslog asks no
           client cert (``authMode="anon"``)
    udp  — imudp (RFC 5426: one message per datagram)
    relp — imrelp (rsyslog-relp), plain TCP; its ruleset runs with
           ``queue.type="Direct"``, so rsyslog answers a RELP frame ``200``
           only after omfile wrote it: an acknowledged event is in the file,
           even if rsyslog is SIGKILLed right after (``kill()``)

Every message received on listener X is written by ``omfile`` to ``X.jsonl``
as one JSON object per line (rsyslog's ``option.jsonf`` template), holding
what rsyslog's RFC 5424 parser made of it — ``pri``, ``app``, ``procid``,
``msgid``, ``sd`` (structured data), ``msg`` — and ``raw``, the message as
received.  Tests read these files with ``received()``.

``stop()`` is rsyslog's graceful shutdown (SIGTERM: inputs closed, queues
drained to the files); ``start()`` brings the same config back on the same
ports, so a test can take the SIEM away and return it mid-stream.  ``close()``
stops it and leaves the files for inspection.

Runnable: ``python -m scripts.peers.rsyslog [DIR]`` prints the ports as JSON
and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, free_port_tcp_udp, wait_for_interrupt, wait_for_tcp
from scripts.peers.certs import make_ca, make_cert

__all__ = ["Rsyslog", "start_rsyslog", "rsyslogd_bin", "relp_available"]

LISTENERS = ("tcp", "tls", "udp")
MAX_MESSAGE_SIZE = "256k"


def rsyslogd_bin() -> str:
    found = shutil.which("rsyslogd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError("rsyslogd not found: run scripts/install/rsyslog.sh")
    return found


MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog")


def gtls_available() -> bool:
    return any(Path(d, "lmnsd_gtls.so").exists() for d in MODULE_DIRS)


def relp_available() -> bool:
    """imrelp comes in its own Debian package, rsyslog-relp."""
    return any(Path(d, "imrelp.so").exists() for d in MODULE_DIRS)


_TEMPLATE = """
template(name="siem" type="list" option.jsonf="on") {
  property(outname="received" name="timegenerated" dateFormat="rfc3339" format="jsonf")
  property(outname="pri" name="pri" format="jsonf")
  property(outname="host" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="time" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="raw" name="rawmsg" format="jsonf")
}
"""


def _config(dir: Path, ports: dict[str, int], cert: Path, key: Path, ca: Path, relp_queue: str = "Direct") -> str:
    parts = [
        f'global(workDirectory="{dir / "work"}" maxMessageSize="{MAX_MESSAGE_SIZE}"',
        f'       defaultNetstreamDriverCAFile="{ca}"',
        f'       defaultNetstreamDriverCertFile="{cert}"',
        f'       defaultNetstreamDriverKeyFile="{key}")',
        # Parse-failures keep the whole message in msg instead of guessing.
        'module(load="imtcp" maxSessions="200")',
        'module(load="imudp")',
        _TEMPLATE,
    ]
    if "relp" in ports:
        parts.insert(-1, 'module(load="imrelp")')
    for name in ports:
        queue = f' queue.type="{relp_queue}"' if name == "relp" else ""
        parts.append(
            f'ruleset(name="{name}"{queue}) {{ action(type="omfile" file="{dir / (name + ".jsonl")}" template="siem" '
            f'flushOnTXEnd="on" asyncWriting="off") }}'
        )
    if "relp" in ports:
        parts.append(f'input(type="imrelp" port="{ports["relp"]}" address="127.0.0.1" ruleset="relp" name="relp" maxDataSize="{MAX_MESSAGE_SIZE}")')
    parts.append(f'input(type="imtcp" port="{ports["tcp"]}" address="127.0.0.1" ruleset="tcp" name="tcp")')
    parts.append(
        f'input(type="imtcp" port="{ports["tls"]}" address="127.0.0.1" ruleset="tls" name="tls" '
        'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")'
    )
    parts.append(f'input(type="imudp" port="{ports["udp"]}" address="127.0.0.1" ruleset="udp" name="udp")')
    return "\n".join(parts) + "\n"


@attrs.define(eq=False)
class Rsyslog:
    dir: Path
    ports: dict[str, int]
    ca_file: Path
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None

    @property
    def conf_file(self) -> Path:
        return self.dir / "rsyslog.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "rsyslogd.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def file(self, listener: str) -> Path:
        return self.dir / f"{listener}.jsonl"

    def address(self, listener: str) -> str:
        return f"{self.host}:{self.ports[listener]}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        if self.running():
            return
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                [rsyslogd_bin(), "-n", "-f", str(self.conf_file), "-i", str(self.dir / "rsyslogd.pid")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.dir),
            )
        try:
            wait_for_tcp(self.host, self.ports["tcp"], timeout=timeout, proc=self._proc)
            wait_for_tcp(self.host, self.ports["tls"], timeout=timeout, proc=self._proc)
            if "relp" in self.ports:
                wait_for_tcp(self.host, self.ports["relp"], timeout=timeout, proc=self._proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"rsyslogd did not start ({exc}):\n{self.log_text()}") from None

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM): rsyslog closes its inputs and drains its queues to the files."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    close = stop

    def kill(self) -> None:
        """SIGKILL: no draining; only what rsyslog already wrote survives."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def received(self, listener: str) -> list[dict]:
        """Every message rsyslog wrote for *listener* so far, as parsed by rsyslog."""
        out = []
        try:
            with open(self.file(listener), "rb") as f:
                for line in f:
                    if line.endswith(b"\n"):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def info(self) -> dict:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file), **{f"{k}_address": self.address(k) for k in self.ports}}


def start_rsyslog(base_dir: str | Path, *, ca: tuple[Path, Path] | None = None, ports: dict[str, int] | None = None,
                  relp_queue: str = "Direct") -> Rsyslog:
    """Write a config under *base_dir* and start rsyslogd on free loopback ports (or on *ports*:
    a test that pointed a sink at a port nobody listened on brings the receiver up there).
    ``relp_queue``: the RELP ruleset's queue type; ``Direct`` acknowledges only written
    messages, ``LinkedList`` (rsyslog's usual in-memory queue) on enqueue, as a production
    SIEM relay would (with a disk-assisted queue) — the benchmark uses that."""
    rsyslogd_bin()
    d = Path(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "work").mkdir(exist_ok=True)
    certs = d / "certs"
    if ca is None:
        ca = make_ca(certs)
    cert, key = make_cert(certs, ca, "localhost", sans=["localhost", "127.0.0.1"])
    last_error: Exception | None = None
    wanted = dict(ports or {})
    for _ in range(3):
        ports = {"tcp": free_port(), "tls": free_port(), "udp": free_port_tcp_udp()}
        if relp_available():
            ports["relp"] = free_port()
        ports.update(wanted)
        server = Rsyslog(dir=d, ports=ports, ca_file=Path(ca[0]))
        server.conf_file.write_text(_config(d, ports, cert, key, Path(ca[0]), relp_queue))
        try:
            server.start()
            return server
        except RuntimeError as exc:  # a port taken between free_port() and rsyslog's bind
            last_error = exc
            time.sleep(0.2)
    raise RuntimeError(f"rsyslogd failed to start: {last_error}")


def _main(argv: list[str]) -> int:
    base = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="rsyslog-"))
    server = start_rsyslog(base)
    print(json.dumps(server.info(), indent=2), flush=True)
    try:
        wait_for_interrupt()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
