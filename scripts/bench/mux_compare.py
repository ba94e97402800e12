"""The agent link's multiplexer measured against the alternative issue 16 names: HTTP/2 over
TLS (``dbproxy.agent.link.H2Link``, as the agent uses it) vs SSH channels (asyncssh
``direct-tcpip`` channels on one SSH connection).

Strategy: each option runs alone in a child process that holds *both* ends of one encrypted
connection on loopback TCP — HTTP/2 under trio (TLS server + h2 client = the proxy, TLS
client + h2 server = the agent, CONNECT streams handled in-process), SSH under plain asyncio
(asyncssh server whose ``connection_requested`` hands each channel to an in-process handler)
— so what is compared is the multiplexer and its encryption, not a target or a network, and
the child's CPU time (``time.process_time``: both ends, all threads) is the whole cost.
Both get the same per-stream credit (``STREAM_WINDOW``, 4 MiB): the SSH channel window is set
to it; SSH keeps asyncssh's default 32 KiB packets (``--ssh-pktsize`` to change), h2 the
link's 1 MiB frames.  Ciphers: TLS as negotiated (TLS 1.3 AES-256-GCM here), SSH pinned to
``aes256-gcm@openssh.com`` so both use the same AEAD.  A third option, ``h2-plain``, is the
same link without TLS: it splits h2's own cost from the encryption wrapper's (``trio.SSLStream``).
Rounds are interleaved (h2, ssh, h2-plain, h2, …) and each figure is the best of them.

Measured per option, proxy → agent direction:
  1. bulk: one stream carries ``--bulk-mb`` MB to a reader that counts it; MB/s, CPU s/MB;
  2. round trips: 64 bytes out, 64 echoed back, for ``--seconds`` on one stream and on
     ``--streams`` concurrent streams; round trips/s;
  3. isolation: a stream whose reader never reads is flooded; once its sender stops making
     progress, another stream moves ``--iso-mb`` MB: its MB/s relative to (1), and the bytes
     the stalled stream's sender got accepted before and after (bounded = flow control holds;
     growing = buffering without bound).

Runnable: ``scripts/bench/mux [--bulk-mb 200 --iso-mb 100 --seconds 3 --streams 50 --rounds 2 --json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 256 * 1024
RR_SIZE = 64
STALL_CHUNK = 64 * 1024
STALL_QUIET = 1.0  # the stalled sender is "blocked" after this long without progress
STALL_LIMIT = 20.0


# --------------------------------------------------------------------------------------------
# HTTP/2 over TLS (trio), the agent's link
# --------------------------------------------------------------------------------------------

def run_h2(args: argparse.Namespace, tls: bool = True) -> dict:
    import trio

    from dbproxy.agent import link as link_mod
    from dbproxy.agent.link import H2Link, LinkStream

    async def handler(stream: LinkStream) -> None:
        await stream.link.respond(stream, 200)
        kind = stream.authority.split(":")[0]
        if kind == "stall":
            await trio.sleep_forever()
        if kind == "sink":
            got = 0
            while data := await stream.receive_some():
                got += len(data)
            await stream.send_all(str(got).encode())
        else:
            while data := await stream.receive_some():
                await stream.send_all(data)
        await stream.send_eof()

    async def main() -> dict:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(args.cert, args.key)
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        out: dict = {}
        async with trio.open_nursery() as nursery:
            agent_tcp = await trio.open_tcp_stream("127.0.0.1", port)
            proxy_tcp = await listeners[0].accept()
            # As dbproxy/agent/client.py and hub.py wrap them: the agent dials and is the TLS client.
            if tls:
                agent_tls = trio.SSLStream(agent_tcp, client_ctx, server_hostname="127.0.0.1")
                proxy_tls = trio.SSLStream(proxy_tcp, server_ctx, server_side=True)
            else:  # h2-plain: the same link without TLS, to show what TLS (trio.SSLStream) costs
                agent_tls, proxy_tls = agent_tcp, proxy_tcp
            agent = H2Link(agent_tls, client=False, handler=handler)
            proxy = H2Link(proxy_tls, client=True)
            nursery.start_soon(agent.run)
            await nursery.start(proxy.run)
            await agent._started.wait()

            async def bulk(stream: LinkStream, mb: int) -> float:
                block = b"b" * CHUNK
                total = mb * 1_000_000
                t0 = time.perf_counter()
                sent = 0
                while sent < total:
                    piece = block[: min(CHUNK, total - sent)]
                    await stream.send_all(piece)
                    sent += len(piece)
                await stream.send_eof()
                reply = b""
                while data := await stream.receive_some():
                    reply += data
                assert int(reply) == total, reply
                return time.perf_counter() - t0

            # (1) bulk
            stream = await proxy.open_stream("sink", 1)
            c0 = time.process_time()
            elapsed = await bulk(stream, args.bulk_mb)
            cpu = time.process_time() - c0
            await stream.aclose()
            out["bulk_mbps"] = args.bulk_mb / elapsed
            out["cpu_s_per_mb"] = cpu / args.bulk_mb

            # (2) round trips
            async def rr(stream: LinkStream, deadline: float, counts: list[int]) -> None:
                msg = b"q" * RR_SIZE
                n = 0
                while time.perf_counter() < deadline:
                    await stream.send_all(msg)
                    got = 0
                    while got < RR_SIZE:
                        got += len(await stream.receive_some())
                    n += 1
                counts.append(n)

            for streams in (1, args.streams):
                opened = [await proxy.open_stream("echo", i) for i in range(streams)]
                counts: list[int] = []
                c0 = time.process_time()
                t0 = time.perf_counter()
                async with trio.open_nursery() as inner:
                    for s in opened:
                        inner.start_soon(rr, s, t0 + args.seconds, counts)
                elapsed = time.perf_counter() - t0
                out[f"rr_{'1' if streams == 1 else 'n'}"] = sum(counts) / elapsed
                out[f"rr_{'1' if streams == 1 else 'n'}_cpu_us"] = (time.process_time() - c0) / sum(counts) * 1e6
                for s in opened:
                    await s.send_eof()
                    await s.aclose()

            # (3) isolation
            stalled = await proxy.open_stream("stall", 1)
            accepted = [0]

            async def flood() -> None:
                block = b"s" * STALL_CHUNK
                while True:
                    await stalled.send_all(block)
                    accepted[0] += len(block)

            nursery.start_soon(flood)
            out["stall_accepted_before"] = await _settle_trio(trio, accepted)
            moving = await proxy.open_stream("sink", 2)
            elapsed = await bulk(moving, args.iso_mb)
            out["iso_mbps"] = args.iso_mb / elapsed
            await trio.sleep(STALL_QUIET)
            out["stall_accepted_after"] = accepted[0]
            out["stream_window"] = link_mod.STREAM_WINDOW
            out["cipher"] = " ".join(str(x) for x in proxy_tls.cipher()[:2]) if tls else "none (plain TCP)"
            nursery.cancel_scope.cancel()
        return out

    return trio.run(main)


async def _settle_trio(trio, accepted: list[int]) -> int:
    """Wait until the stalled sender makes no progress for STALL_QUIET (or STALL_LIMIT passes)."""
    start = time.monotonic()
    last, since = accepted[0], time.monotonic()
    while time.monotonic() - start < STALL_LIMIT:
        await trio.sleep(0.05)
        if accepted[0] != last:
            last, since = accepted[0], time.monotonic()
        elif time.monotonic() - since >= STALL_QUIET:
            break
    return accepted[0]


# --------------------------------------------------------------------------------------------
# SSH channels (asyncssh, plain asyncio)
# --------------------------------------------------------------------------------------------

def run_ssh(args: argparse.Namespace) -> dict:
    import asyncio

    import asyncssh

    from dbproxy.agent.link import STREAM_WINDOW

    window, pktsize = STREAM_WINDOW, args.ssh_pktsize
    algs = ["aes256-gcm@openssh.com"]

    async def handle(reader: asyncssh.SSHReader, writer: asyncssh.SSHWriter, kind: str) -> None:
        if kind == "stall":
            await asyncio.Event().wait()
        if kind == "sink":
            got = 0
            while data := await reader.read(CHUNK):
                got += len(data)
            writer.write(str(got).encode())
        else:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        writer.write_eof()
        await writer.drain()

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            return False  # no authentication: what is measured is the channels, not the login

        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            chan = self.conn.create_tcp_channel(window=window, max_pktsize=pktsize)
            return chan, lambda r, w: handle(r, w, dest_host)

    async def main() -> dict:
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.listen("127.0.0.1", 0, server_factory=Server, server_host_keys=[key],
                                       encryption_algs=algs)
        port = server.sockets[0].getsockname()[1]
        conn = await asyncssh.connect("127.0.0.1", port, username="bench", known_hosts=None,
                                      encryption_algs=algs)
        out: dict = {}

        async def open_(kind: str, n: int):
            return await conn.open_connection(kind, n, window=window, max_pktsize=pktsize)

        async def bulk(reader, writer, mb: int) -> float:
            block = b"b" * CHUNK
            total = mb * 1_000_000
            t0 = time.perf_counter()
            sent = 0
            while sent < total:
                piece = block[: min(CHUNK, total - sent)]
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            writer.write_eof()
            reply = b""
            while data := await reader.read(CHUNK):
                reply += data
            assert int(reply) == total, reply
            return time.perf_counter() - t0

        reader, writer = await open_("sink", 1)
        c0 = time.process_time()
        elapsed = await bulk(reader, writer, args.bulk_mb)
        cpu = time.process_time() - c0
        writer.close()
        out["bulk_mbps"] = args.bulk_mb / elapsed
        out["cpu_s_per_mb"] = cpu / args.bulk_mb

        async def rr(reader, writer, deadline: float, counts: list[int]) -> None:
            msg = b"q" * RR_SIZE
            n = 0
            while time.perf_counter() < deadline:
                writer.write(msg)
                await writer.drain()
                await reader.readexactly(RR_SIZE)
                n += 1
            counts.append(n)

        for streams in (1, args.streams):
            opened = [await open_("echo", i) for i in range(streams)]
            counts: list[int] = []
            c0 = time.process_time()
            t0 = time.perf_counter()
            await asyncio.gather(*(rr(r, w, t0 + args.seconds, counts) for r, w in opened))
            elapsed = time.perf_counter() - t0
            out[f"rr_{'1' if streams == 1 else 'n'}"] = sum(counts) / elapsed
            out[f"rr_{'1' if streams == 1 else 'n'}_cpu_us"] = (time.process_time() - c0) / sum(counts) * 1e6
            for _, w in opened:
                w.close()

        _, stalled = await open_("stall", 1)
        accepted = [0]

        async def flood() -> None:
            block = b"s" * STALL_CHUNK
            while True:
                stalled.write(block)
                await stalled.drain()
                accepted[0] += len(block)

        flooder = asyncio.ensure_future(flood())
        out["stall_accepted_before"] = await _settle_asyncio(asyncio, accepted)
        reader, writer = await open_("sink", 2)
        elapsed = await bulk(reader, writer, args.iso_mb)
        out["iso_mbps"] = args.iso_mb / elapsed
        await asyncio.sleep(STALL_QUIET)
        out["stall_accepted_after"] = accepted[0]
        out["stream_window"] = window
        out["cipher"] = f"{conn.get_extra_info('send_cipher')} pkt {pktsize}"
        flooder.cancel()
        conn.abort()
        server.close()
        return out

    return asyncio.run(main())


async def _settle_asyncio(asyncio, accepted: list[int]) -> int:
    start = time.monotonic()
    last, since = accepted[0], time.monotonic()
    while time.monotonic() - start < STALL_LIMIT:
        await asyncio.sleep(0.05)
        if accepted[0] != last:
            last, since = accepted[0], time.monotonic()
        elif time.monotonic() - since >= STALL_QUIET:
            break
    return accepted[0]


# --------------------------------------------------------------------------------------------
# The parent: one child per option, a table, a verdict
# --------------------------------------------------------------------------------------------

OPTIONS = {"h2": ("HTTP/2 over TLS (H2Link)", run_h2), "ssh": ("SSH channels (asyncssh)", run_ssh),
           "h2-plain": ("HTTP/2, no TLS (reference)", lambda args: run_h2(args, tls=False))}
# Per metric, the best of the rounds (a noisy machine only ever makes a figure worse).
BEST = {"bulk_mbps": max, "cpu_s_per_mb": min, "rr_1": max, "rr_1_cpu_us": min, "rr_n": max, "rr_n_cpu_us": min,
        "iso_mbps": max, "stall_accepted_before": max, "stall_accepted_after": max}


def child(option: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "scripts.bench.mux_compare", "--child", option, "--bulk-mb", str(args.bulk_mb),
           "--iso-mb", str(args.iso_mb), "--seconds", str(args.seconds), "--streams", str(args.streams),
           "--ssh-pktsize", str(args.ssh_pktsize), "--ca", args.ca, "--cert", args.cert, "--key", args.key]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{option} child failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def report(results: dict[str, dict], args: argparse.Namespace, load: tuple) -> str:
    lines = [f"mux_compare {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {os.cpu_count()} CPUs, "
             f"load avg before {load[0]:.2f} after {os.getloadavg()[0]:.2f}",
             f"sizes: bulk {args.bulk_mb} MB, isolation {args.iso_mb} MB, round trips {args.seconds:g} s, "
             f"{args.streams} streams, best of {args.rounds} interleaved round(s); both ends in one process per option, loopback"]
    if args.note:
        lines.append(f"note: {args.note}")
    rows = [("", *(OPTIONS[o][0] for o in results)),
            ("encryption", *(r["cipher"] for r in results.values())),
            ("(1) bulk 1 stream MB/s", *(f"{r['bulk_mbps']:.1f}" for r in results.values())),
            ("(4) CPU s per MB (both ends)", *(f"{r['cpu_s_per_mb'] * 1000:.2f} ms" for r in results.values())),
            ("(2) 64 B round trips/s, 1 stream", *(f"{r['rr_1']:.0f}" for r in results.values())),
            (f"(2) 64 B round trips/s, {args.streams} streams", *(f"{r['rr_n']:.0f}" for r in results.values())),
            ("    CPU µs per round trip (1 / N)", *(f"{r['rr_1_cpu_us']:.0f} / {r['rr_n_cpu_us']:.0f}"
                                                   for r in results.values())),
            ("(3) moving stream MB/s beside a stall", *(f"{r['iso_mbps']:.1f} ({r['iso_mbps'] / r['bulk_mbps']:.0%} of 1)"
                                                      for r in results.values())),
            ("(3) stalled sender accepted before/after", *(f"{_mib(r['stall_accepted_before'])} / "
                                                          f"{_mib(r['stall_accepted_after'])}"
                                                          for r in results.values())),
            ("    per-stream window", *(_mib(r["stream_window"]) for r in results.values()))]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append("verdict: " + verdict(results))
    return "\n".join(lines)


def verdict(results: dict[str, dict]) -> str:
    if not {"h2", "ssh"} <= set(results):
        return "(both options are needed for a verdict)"
    h, s = results["h2"], results["ssh"]

    def bounded(r: dict) -> bool:
        return r["stall_accepted_after"] == r["stall_accepted_before"] and \
            r["stall_accepted_after"] <= 4 * r["stream_window"]

    parts = [f"bulk h2/ssh {h['bulk_mbps'] / s['bulk_mbps']:.2f}x",
             f"CPU/MB h2/ssh {h['cpu_s_per_mb'] / s['cpu_s_per_mb']:.2f}x",
             f"round trips h2/ssh {h['rr_1'] / s['rr_1']:.2f}x (1 stream), {h['rr_n'] / s['rr_n']:.2f}x (N)",
             "stalled stream bounded: h2 " + ("yes" if bounded(h) else "NO") + ", ssh " + ("yes" if bounded(s) else "NO")]
    score = sum((h["bulk_mbps"] >= s["bulk_mbps"], h["cpu_s_per_mb"] <= s["cpu_s_per_mb"], h["rr_1"] >= s["rr_1"],
                 h["rr_n"] >= s["rr_n"]))
    if score == 4:
        lead = "HTTP/2 is at least as good on every measure"
    elif score == 0:
        lead = "SSH channels are better on every measure"
    else:
        lead = f"mixed (h2 ahead on {score} of 4 speed/CPU measures)"
    return f"{lead}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk-mb", type=int, default=200)
    ap.add_argument("--iso-mb", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--ssh-pktsize", type=int, default=32768, help="SSH channel max packet size (asyncssh default)")
    ap.add_argument("--options", default="h2,ssh,h2-plain", help="h2, ssh, h2-plain (the link without TLS)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each figure is the best of them")
    ap.add_argument("--note", default="", help="a line printed with the results (e.g. the machine's load)")
    ap.add_argument("--json", help="write settings and results here")
    ap.add_argument("--child", choices=sorted(OPTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(OPTIONS[args.child][1](args)))
        return 0
    from scripts.peers.certs import make_ca, make_cert

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mux-bench-") as tmp:
        ca = make_ca(Path(tmp) / "tls")
        cert, key = make_cert(Path(tmp) / "tls", ca, "agents", sans=["127.0.0.1"])
        args.ca, args.cert, args.key = str(ca[0]), str(cert), str(key)
        runs: dict[str, list[dict]] = {option: [] for option in args.options.split(",")}
        for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every option alike
            for option in runs:
                runs[option].append(child(option, args))
                print(f"{option}: {json.dumps(runs[option][-1])}", file=sys.stderr, flush=True)
    results = {option: {key: BEST[key](r[key] for r in rs) if key in BEST else rs[-1][key] for key in rs[0]}
               for option, rs in runs.items()}
    text = report(results, args, load)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                            if k not in ("ca", "cert", "key", "child")},
                                               "runs": runs, "best": results, "report": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
