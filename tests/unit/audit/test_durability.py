"""``"durability": "ack"`` in the proxy's own loop (``"worker": false``): the pipeline holds what the
backend answers until the session's audit events are written.

The sink here is a fake that only a test can make slow on demand (a disk that stalls): its writes wait
for the test's go.  A stage on the backend pump audits every answer (as ``BackendAudit`` records a
CommandComplete); in "ack" mode the client gets the answer only once the sink wrote that event, while
the default ("async") session forwards at once.  The config key is validated with file, path and
expectation; the worker path of the same promise is tested in ``tests/integration/test_audit_durability``.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from dbproxy.audit.recorder import AuditRecorder, DurableSessionAudit, SessionAudit
from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.pipeline import Pipeline
from dbproxy.session import Session
from dbproxy.engines import default_registry
from tests.unit.core.test_pipeline import LengthDecoder, Recv, frame


class StallingSink:
    """A sink whose disk stalls until the test says go (not producible with a real file)."""

    name = "stalling"

    def __init__(self) -> None:
        self.go = trio.Event()
        self.lines: list[bytes] = []

    async def write_batch(self, batch) -> None:
        await self.go.wait()
        self.lines.extend(batch.lines)

    async def aclose(self) -> None:
        pass


class AuditAnswers:
    """Audits each backend message as a result (what BackendAudit does with CommandComplete)."""

    name = "audit"

    def __init__(self, audit) -> None:
        self.audit = audit

    def handle(self, msg, ctx):
        self.audit.on_result(success=True, command_tag=msg.body.decode())
        return None


@pytest.mark.parametrize("durable", [True, False])
async def test_an_answer_waits_for_its_audit_record_only_in_ack_mode(durable):
    sink = StallingSink()
    recorder = AuditRecorder([sink], durable_sessions=durable)
    session = Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:5555")
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        audit = recorder.session(session)
        assert type(audit) is (DurableSessionAudit if durable else SessionAudit)
        session.started = True
        client_side, proxy_client = trio.testing.memory_stream_pair()
        proxy_backend, backend_side = trio.testing.memory_stream_pair()
        pipeline = Pipeline(session=session, client=proxy_client, backend=proxy_backend,
                            client_decoder=LengthDecoder(), backend_decoder=LengthDecoder(),
                            client_stages=[], backend_stages=[AuditAnswers(audit)], flush_audit=audit.flush)
        nursery.start_soon(pipeline.run)
        answer = frame(b"SELECT 1")
        await backend_side.send_all(answer)
        got = Recv(client_side)
        with trio.move_on_after(0.5):
            await got.until(len(answer))
        if durable:
            assert got.data == b"" and sink.lines == []  # held: its audit record is not written
            sink.go.set()
            assert await got.until(len(answer)) == answer
            assert len(sink.lines) == 1 and b'"command_tag":"SELECT 1"' in sink.lines[0]
        else:
            assert got.data == answer and sink.lines == []  # async: the answer does not wait
            sink.go.set()
        await client_side.aclose()
        await backend_side.aclose()
        await recorder.aclose()


def test_durability_is_validated(tmp_path):
    secret = tmp_path / "backend.secret"
    secret.write_text("unused\n")
    backend = {"address": "127.0.0.1:1", "database": "app", "user": "app",
               "auth": {"method": "scram-sha-256", "password_file": str(secret)}}
    listeners = [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                  "routes": [{"name": "r", "backend": backend}]}]

    def config(audit: dict) -> str:
        path = tmp_path / "dbproxy.json"
        path.write_text(json.dumps({"listeners": listeners, "audit": audit}))
        return str(path)

    assert load_config(config({}), default_registry()).audit.durability == "async"
    assert load_config(config({"durability": "ack"}), default_registry()).audit.durability == "ack"
    with pytest.raises(ConfigErrors) as err:
        load_config(config({"durability": "fsync"}), default_registry())
    text = str(err.value)
    assert "dbproxy.json" in text and "audit.durability" in text and "one of async, ack" in text
