"""What the PostgreSQL engine declares for its pipeline, and what the core makes of it (``flow.assemble``).

Proven here (no server: the pipeline's stages are driven by hand with real messages):

- the engine declares its audit stages and ``LastBackendMessage`` as observers, the policy (only with
  statement rules) as active stages, and ``TAP_PLAN``; it decides nothing itself;
- without statement rules and with an audit that can tap, the core taps: both decoders become Tees
  over the decoders' buffers and limits, no stage runs on the proxy, the tap opens with ``tap.Tap``;
  with an in-process audit the same observers run inline;
- with statement rules the observers run inline, in the order that keeps the trail right: the
  frontend audit before the policy (the attempt is recorded), the backend policy before the
  observers — and a denied statement's rewritten error is shown to the observers by the policy, so
  the result event carries 42501 and the backend's last type is ErrorResponse.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from dbproxy.audit.recorder import AuditRecorder
from dbproxy.channel import MessageStream
from dbproxy.config import ListenerConfig
from dbproxy.engine import Services
from dbproxy.flow import Backend, Request, assemble
from dbproxy.roles import Grant
from dbproxy.sansio import NEED_DATA
from dbproxy.session import Identity, Session
from dbproxy.tee import Tee
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import BackendDecoder, FrontendDecoder
from dbproxy.engines.postgres.engine import PostgresEngine
from dbproxy.engines.postgres.stages import LastBackendMessage
from dbproxy.engines.postgres.policy import BackendPolicy, FrontendPolicy
from dbproxy.engines.postgres.stages import BackendAudit, FrontendAudit
from dbproxy.engines.postgres.tap import TAP_PLAN, Tap


class TappableAudit:
    """A session's audit as the worker mode gives it (``can_tap``), recording the tap calls."""

    can_tap = True

    def __init__(self, audit: Any) -> None:
        self.inner = audit
        self.calls: list = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def tap_open(self, tap: type, params: dict | None = None) -> int:
        self.calls.append(("open", tap))
        return 3

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        self.calls.append(("tap", direction, data))

    def tap_close(self, slot: int) -> None:
        self.calls.append(("close", slot))


def session_with(can_tap: bool) -> tuple[Session, AuditRecorder]:
    recorder = AuditRecorder(sinks=[])
    s = Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:5432")
    s.identity = Identity(user="alice", roles=("dba",), method="token")
    s.db_name, s.db_user, s.backend_addr, s.route_name = "app", "app", "127.0.0.1:5433", "main"
    s.started = True
    audit = recorder.session(s)
    s.audit = TappableAudit(audit) if can_tap else audit
    return s, recorder


def wire(can_tap: bool, grant: Grant | None):
    listener = ListenerConfig(name="pg", protocol="postgres", host="127.0.0.1", port=0, tls=None, routes=())
    engine = PostgresEngine(listener, Services(recorder=None))
    session, recorder = session_with(can_tap)
    request = Request(MessageStream(None, FrontendDecoder(startup=False, max_message_size=1000)), extra={})
    backend = Backend(None, BackendDecoder(max_message_size=2000))
    wiring = engine.wiring(session, request, backend, grant)
    return wiring, assemble(wiring, session.audit), session, recorder


def kinds(stages: list) -> list[type]:
    return [type(s) for s in stages]


def test_the_engine_declares_and_the_core_taps() -> None:
    wiring, plumbing, session, _ = wire(True, None)
    assert kinds(wiring.client_observers) == [FrontendAudit]
    assert kinds(wiring.backend_observers) == [LastBackendMessage, BackendAudit]
    assert wiring.client_stages == wiring.backend_stages == [] and wiring.tap is TAP_PLAN
    assert wiring.tapped and plumbing.client_stages == plumbing.backend_stages == []
    client, backend = wiring.tees
    assert (plumbing.client_decoder, plumbing.backend_decoder) == (client, backend)
    assert type(client) is Tee and (client.limit, backend.limit) == (1000, 2000)
    assert session.audit.calls == [("open", Tap)]
    query = m.encode_query("select 1")
    client.feed(query + m.encode_terminate())
    assert client.next_message() is NEED_DATA
    assert session.audit.calls[1:] == [("tap", 0, query + m.encode_terminate())]
    plumbing.close()
    assert session.audit.calls[-1] == ("close", 3)


@pytest.mark.parametrize("grant", [None, Grant(roles=("dba",))])
def test_an_in_process_audit_runs_the_same_observers_inline(grant) -> None:
    wiring, plumbing, _, _ = wire(False, grant)
    assert not wiring.tapped
    assert kinds(plumbing.client_stages) == [FrontendAudit]
    assert kinds(plumbing.backend_stages) == [LastBackendMessage, BackendAudit]


def test_statement_rules_keep_the_observers_inline_around_the_policy() -> None:
    grant = Grant(roles=("dev",), deny_commands=("DROP*",), restricted=True)
    wiring, plumbing, session, recorder = wire(True, grant)
    assert not wiring.tapped and session.audit.calls == []
    assert kinds(plumbing.client_stages) == [FrontendAudit, FrontendPolicy]
    assert kinds(plumbing.backend_stages) == [BackendPolicy, LastBackendMessage, BackendAudit]

    def run(stages: list, raw: bytes):
        msg = m.Message(raw[0], raw)
        for stage in stages:
            verdict = stage.handle(msg, None)
            if verdict is not None:
                return verdict
        return None

    verdict = run(plumbing.client_stages, m.encode_query("DROP TABLE t"))
    assert verdict is not None  # refused: a marker statement goes to the backend instead
    marker = m.parse_query(m.Message(m.FE.QUERY, verdict.replace[0]))
    # The backend's syntax error naming the marker, rewritten by the policy.
    error = m.encode_error("ERROR", "42601", f'syntax error at or near "{marker}"')
    assert run(plumbing.backend_stages, error) is not None
    assert run(plumbing.backend_stages, m.encode_ready_for_query()) is None
    last_backend = plumbing.backend_stages[1]
    assert last_backend.last_type == m.BE.READY_FOR_QUERY
    events = [orjson.loads(b) for b in recorder._queue]
    query = next(e for e in events if e["event"] == "db.session.query")
    result = next(e for e in events if e["event"] == "db.session.result")
    assert query["db_query"] == "DROP TABLE t"  # the attempt, recorded before the policy refused it
    assert (result["success"], result["sqlstate"], result["query_uid"]) == (False, "42501", query["uid"])


def test_a_rewritten_error_is_the_backends_last_type() -> None:
    grant = Grant(roles=("dev",), deny_commands=("DROP*",), restricted=True)
    wiring, plumbing, _, _ = wire(True, grant)
    policy, last_backend = plumbing.backend_stages[0], plumbing.backend_stages[1]
    frontend_policy = plumbing.client_stages[1]
    verdict = frontend_policy.handle(m.Message(m.FE.QUERY, m.encode_query("DROP TABLE t")), None)
    marker = m.parse_query(m.Message(m.FE.QUERY, verdict.replace[0]))
    error = m.encode_error("FATAL", "42601", f'syntax error at or near "{marker}"')
    assert policy.handle(m.Message(m.BE.ERROR_RESPONSE, error), None) is not None
    assert last_backend.last_type == m.BE.ERROR_RESPONSE  # shown the rewritten error by the policy
