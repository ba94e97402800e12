"""The RELP sink's window holds for any batch, and a break re-sends at most the window.

Found by CI (tests/integration/test_audit_relp.py, rsyslog stopped mid-stream): 65 events arrived
twice with a window of 64.  A spool batch (up to 1000 events) larger than the window was sent whole
once nothing was in flight, so more than ``window`` frames could be unanswered when the
connection broke, and every one of them came again.

The RELP server here is a stand-in, on purpose: it answers ``200`` only when the test says so, and
breaks the session after a chosen frame.  rsyslog cannot be made to hold its acknowledgements or to
drop a session at a given frame; the real rsyslog runs in the integration tests.
"""

from __future__ import annotations

import trio

from dbproxy.audit.sinks.relp import RelpSink
from dbproxy.audit.sinks.relp_protocol import NEED_DATA, RelpDecoder, encode_frame

WINDOW = 8


class StandInServer:
    """Records each session's ``syslog`` frames; acknowledges up to ``ack_limit`` frames per
    session, and closes a session once it has received ``close_after`` frames (None: never)."""

    def __init__(self) -> None:
        self.sessions: list[list[bytes]] = []
        self.acked: list[int] = []
        self.max_unanswered = 0
        self.ack_limit: int | None = None
        self.close_after: int | None = None
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._session, listeners)

    async def _session(self, stream: trio.SocketStream) -> None:
        frames: list[bytes] = []
        self.sessions.append(frames)
        index = len(self.sessions) - 1
        self.acked.append(0)
        ack_limit, close_after = self.ack_limit, self.close_after
        decoder = RelpDecoder()
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                decoder.feed(data)
                out = bytearray()
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    if frame.command == "open":
                        out += encode_frame(frame.txnr, "rsp", b"200 OK\nrelp_version=0\ncommands=syslog")
                        continue
                    assert frame.command == "syslog", frame
                    frames.append(frame.data)
                    self.max_unanswered = max(self.max_unanswered, len(frames) - self.acked[index])
                    if ack_limit is None or self.acked[index] < ack_limit:
                        out += encode_frame(frame.txnr, "rsp", b"200 OK")
                        self.acked[index] += 1
                if out:
                    await trio.sleep(0.005)  # answers come a little later, as from a busy server
                    await stream.send_all(bytes(out))
                if close_after is not None and len(frames) >= close_after:
                    return


def _event(seq: int) -> dict:
    return {"seq": seq, "hash": f"{seq:064x}", "event": "e"}


def _sink(tmp_path, port: int) -> RelpSink:
    return RelpSink(
        name="siem", host="127.0.0.1", port=port, window=WINDOW, spool_dir=str(tmp_path / "spool"),
        retry_initial_seconds=0.01, retry_max_seconds=0.05,
    )


def _seqs(frames: list[bytes]) -> list[int]:
    return [int(raw.split(b' seq="', 1)[1].split(b'"', 1)[0]) for raw in frames]


async def test_a_batch_larger_than_the_window_never_has_more_than_the_window_unanswered(tmp_path):
    server = StandInServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        sink = _sink(tmp_path, server.port)
        await nursery.start(sink.run)
        await sink.write_batch([_event(seq) for seq in range(1, 101)])  # one spool batch of 100
        with trio.fail_after(10):
            await sink.wait_idle()
        assert _seqs(server.sessions[0]) == list(range(1, 101))
        assert len(server.sessions) == 1 and sink.delivered == 100
        assert server.max_unanswered <= WINDOW, f"{server.max_unanswered} frames unanswered with a window of {WINDOW}"
        nursery.cancel_scope.cancel()
    await sink.aclose()


async def test_a_break_mid_batch_resends_only_what_was_not_acknowledged(tmp_path):
    """30 events in one batch; the first session acknowledges 12 frames, then closes after 16
    (12 + 4 unanswered).  The retry must begin at event 13: 4 repeats, not the whole batch."""
    server = StandInServer()
    server.ack_limit, server.close_after = 12, 16
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        sink = _sink(tmp_path, server.port)
        await nursery.start(sink.run)
        await sink.write_batch([_event(seq) for seq in range(1, 31)])
        with trio.fail_after(5):
            while not server.sessions or len(server.sessions[0]) < 16:
                await trio.sleep(0.01)
        server.ack_limit, server.close_after = None, None  # the server is well again
        with trio.fail_after(10):
            await sink.wait_idle()
        first, *rest = [_seqs(frames) for frames in server.sessions]
        assert first == list(range(1, 17)), f"first session: {first}"
        resent = [seqs for seqs in rest if seqs]
        assert len(resent) == 1 and resent[0] == list(range(13, 31)), f"sessions after the break: {rest}"
        assert sink.delivered == 30 and sink.spool.pending_events == 0
        nursery.cancel_scope.cancel()
    await sink.aclose()


async def test_repeated_breaks_lose_nothing_and_repeat_at_most_the_window(tmp_path):
    """Batches keep coming while sessions break, each after a different number of frames, with
    some frames unanswered.  When the break stops a batch being submitted, the batches submitted
    before it are still confirmed (the spooled base used to cancel them with the failure, and
    they came again) and the batch's acknowledged frames count; so each new session begins at
    the first unacknowledged frame, each break repeats at most the window, and every event
    arrives."""
    server = StandInServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        sink = _sink(tmp_path, server.port)
        await nursery.start(sink.run)
        seq = 0
        for ack_limit, close_after in [(10, 15), (3, 9), (20, 25), (0, 5), (7, 8)]:
            server.ack_limit, server.close_after = ack_limit, close_after
            sessions = len(server.sessions)
            with trio.fail_after(10):
                while len(server.sessions) == sessions or len(server.sessions[-1]) < close_after:
                    for _ in range(3):  # small batches keep arriving meanwhile
                        seq += 1
                        await sink.write_batch([_event(seq)])
                    await trio.sleep(0.002)
        server.ack_limit, server.close_after = None, None
        with trio.fail_after(10):
            await sink.wait_idle()
        seqs = [s for frames in server.sessions for s in _seqs(frames)]
        assert sorted(set(seqs)) == list(range(1, seq + 1)), "some events never arrived"
        used = [(_seqs(frames), acked) for frames, acked in zip(server.sessions, server.acked) if frames]
        for (before, acked), (after, _) in zip(used, used[1:]):
            # The next session starts at the first frame the broken one did not acknowledge.
            assert after[0] == before[acked], f"after a break with {acked} of {len(before)} acknowledged, the next session began at {after[0]}"
            assert len(set(before) & set(after)) <= WINDOW
        assert server.max_unanswered <= WINDOW
        nursery.cancel_scope.cancel()
    await sink.aclose()
