"""Record the X.224 bytes the unit tests replay (run once by hand; the .bin files are committed).

    python tests/unit/rdp/capture.py XRDP_PORT

For each client variant, a listener takes xfreerdp's first TPKT (its X.224 Connection Request),
saves it as ``data/cr_<name>.bin``, forwards it to the real xrdp on XRDP_PORT and saves xrdp's
answer (its Connection Confirm) as ``data/cc_<name>.bin``; the connection then closes (xfreerdp
fails the TLS step, which does not matter here).  xfreerdp runs under ``xvfb-run`` (it is an X
client even when it never draws).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

VARIANTS = {
    # /u: → the cookie ``Cookie: mstshash=USER``; every protocol offered (SSL|HYBRID|...).
    "user": ["/u:dbprdp", "/p:x"],
    # A routing token instead of the cookie (how a client names a target to the proxy).
    "token": ["/u:dbprdp", "/p:x", "/load-balance-info:dbproxy:web1"],
    # TLS only (no NLA offered).
    "tls": ["/u:dbprdp", "/p:x", "/sec:tls"],
    # Standard RDP security only: requestedProtocols = PROTOCOL_RDP (0).
    "rdp": ["/u:dbprdp", "/p:x", "/sec:rdp"],
}


def _read_tpkt(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < int.from_bytes(data[2:4], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def capture(name: str, args: list[str], xrdp_port: int) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    out: dict = {}

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            cr = _read_tpkt(conn)
            out["cr"] = cr
            with socket.create_connection(("127.0.0.1", xrdp_port)) as up:
                up.sendall(cr)
                out["cc"] = _read_tpkt(up)

    t = threading.Thread(target=serve)
    t.start()
    subprocess.run(["timeout", "20", "xvfb-run", "-a", "xfreerdp", f"/v:127.0.0.1:{port}", "/cert:ignore",
                    "/auth-only", *args], capture_output=True)
    t.join(10)
    lsock.close()
    for key in ("cr", "cc"):
        with open(os.path.join(HERE, f"{key}_{name}.bin"), "wb") as f:
            f.write(out[key])
    print(name, out["cr"].hex(), out["cc"].hex())


if __name__ == "__main__":
    for name, args in VARIANTS.items():
        capture(name, args, int(sys.argv[1]))
