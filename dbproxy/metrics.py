"""Prometheus metrics of one ``ProxyServer`` (prometheus-client, a registry per server).

Strategy: nothing here runs per message.  What moves per session is counted
once per session — its end (``session_closed``: the outcome, the pipeline's
end-of-session byte and message totals), its backend login
(``backend_login``: the latency histogram), a refusal or error
(``error``).  Everything else is read when Prometheus scrapes
(``_Collector.collect``): the sessions running now and their state, the
live byte and message counts of running pipelines (their pumps count them
already, ``Pipeline.statistics``), and the audit's queue depth, lag and
sinks — from the in-process ``AuditRecorder`` or, with the audit worker,
from the ``AuditLink`` (frames queued / not acked, the age of the oldest
unacked write) and the statistics the worker reports over the link every
second (its queue, its sinks' spools and delivery lag).  So a busy proxy
pays nothing for metrics until they are read.

A registry per server (not prometheus-client's global one): in-process
servers (tests, ``dbproxy.serve``) each have their own numbers.

Byte and message counters are what the proxy *received* in each direction
(``client_to_backend``: from the client, ``backend_to_client``: from the
backend), as the pumps count them.  A session's live counts move into the
ended-sessions totals when it ends, so the exported counters only grow.

``readiness`` / ``health`` are the answers of ``/readyz`` and ``/healthz``
(``dbproxy.admin`` serves them).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Backend login (connect, TLS, authentication): tens of ms on a LAN, seconds for Kerberos or a
# slow backend; the flow gives up at CONNECT_TIMEOUT (15 s).
LOGIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)
DIRECTIONS = ("client_to_backend", "backend_to_client")
STATES = ("starting", "running")


class ProxyMetrics:
    """The server's metrics; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["protocol", "listener"]
        self.sessions = Counter(
            "dbproxy_sessions", "Client sessions ended, by outcome: completed (it ran), refused (turned away: "
            "login, access, audit unavailable), abandoned (the client left before a session started), failed "
            "(an internal error)", [*labels, "outcome"], registry=self.registry)
        self.errors = Counter(
            "dbproxy_errors", "Refusals and errors by kind and code: code is the protocol's own (SQLSTATE, CQL, "
            "Mongo) when the engine gave one", [*labels, "kind", "code"], registry=self.registry)
        self.login = Histogram(
            "dbproxy_backend_login_seconds", "The proxy's own login to the backend (connect, TLS, authentication)",
            [*labels, "outcome"], buckets=LOGIN_BUCKETS, registry=self.registry)
        # Totals of ended sessions, (protocol, listener, direction) -> count.
        self.ended_bytes: dict[tuple, int] = {}
        self.ended_messages: dict[tuple, int] = {}
        self.live: dict[str, Any] = {}  # session id -> its running pipeline (statistics())
        self.started_at = time.time()
        self.registry.register(_Collector(self))

    # -- once per session ------------------------------------------------------------------
    def running(self, session: Any, pipeline: Any) -> None:
        """The session's pipeline runs: its live counts are read at scrape time."""
        self.live[session.id] = pipeline

    def traffic(self, session: Any, pipeline: Any) -> None:
        """The session's pipeline ended: its totals join the ended sessions'."""
        self.live.pop(session.id, None)
        for direction, (nbytes, messages) in zip(DIRECTIONS, pipeline_counts(pipeline)):
            key = (session.protocol, session.listener, direction)
            self.ended_bytes[key] = self.ended_bytes.get(key, 0) + nbytes
            self.ended_messages[key] = self.ended_messages.get(key, 0) + messages

    def backend_login(self, session: Any, seconds: float, ok: bool) -> None:
        self.login.labels(session.protocol, session.listener, "ok" if ok else "failed").observe(seconds)

    def error(self, session: Any, kind: str, code: Any = None) -> None:
        self.errors.labels(session.protocol, session.listener, kind, "" if code is None else str(code)).inc()

    def session_closed(self, session: Any, outcome: str) -> None:
        pipeline = self.live.pop(session.id, None)
        if pipeline is not None:  # the flow did not get to its end statistics (connection lost)
            try:
                self.traffic(session, pipeline)
            except Exception:
                pass
        self.sessions.labels(session.protocol, session.listener, outcome).inc()


def pipeline_counts(pipeline: Any) -> list[tuple[int, int]]:
    """(bytes received, messages) per direction, from what the pumps count already.  A tapped
    session's pumps decode no messages: its tees count the frames they walked (``Tee.frames``)."""
    out = []
    for stats, pump in zip(pipeline.statistics(), (getattr(pipeline, "c2b", None), getattr(pipeline, "b2c", None))):
        frames = getattr(getattr(pump, "decoder", None), "frames", 0)
        # A relay that owns its transport (SSH, Telnet) counts bytes, not messages.
        messages = getattr(stats, "messages", 0)
        out.append((stats.bytes_in, messages + (frames if type(frames) is int else 0)))
    return out


def audit_state(recorder: Any) -> dict:
    """What the audit side knows now, from an ``AuditLink`` (worker) or an in-process ``AuditRecorder``."""
    stats = recorder.statistics()
    link_statistics = getattr(recorder, "link_statistics", None)
    if link_statistics is not None:
        link = link_statistics()
        return {
            "worker": True,
            "worker_up": link.worker_up,
            "worker_starts": link.worker_starts,
            "accepting": bool(stats.accepting),
            "queued_frames": link.queued_frames,
            "unacked_frames": link.unacked_frames,
            "queued_bytes": link.queued_bytes,
            "lag_seconds": link.lag_seconds,
            "replayed": link.replayed,
            "submitted": stats.submitted,
            "worker_queued": (getattr(recorder, "worker_stats", None) or {}).get("queued", 0),
            "written": stats.written,
            "sink_failures": stats.sink_failures,
            "sinks": [sink_dict(s) for s in stats.sinks],
        }
    return {
        "worker": False,
        "worker_up": True,
        "accepting": bool(stats.accepting),
        "queued_frames": stats.queued,
        "unacked_frames": max(0, stats.submitted - getattr(recorder, "durable", stats.written)),
        "submitted": stats.submitted,
        "written": stats.written,
        "sink_failures": stats.sink_failures,
        "sinks": [sink_dict(s) for s in stats.sinks],
    }


def sink_dict(stats: Any) -> dict:
    import attrs

    return attrs.asdict(stats) if attrs.has(type(stats)) else dict(stats)


def readiness(server: Any) -> tuple[bool, str]:
    """Ready: serving and the audit accepts sessions (not failing closed, its worker up)."""
    if server.stopping:
        return False, "stopping: no new sessions"
    if not server.listening:
        return False, "listeners not bound yet"
    audit = audit_state(server.recorder)
    if not audit["worker_up"]:
        return False, "the audit worker is down (sessions are refused until it is back)"
    if not audit["accepting"]:
        blocked = [s["name"] for s in audit["sinks"] if s.get("blocked")]
        which = f" (sink {', '.join(blocked)} blocked)" if blocked else ""
        return False, f"the audit fails closed{which}: sessions are refused"
    return True, "ready"


def health(server: Any) -> tuple[bool, dict]:
    """Alive, and every configured listener is bound."""
    names = {b.name for b in server.bound}
    missing = [lc.name for lc in server.config.listeners if lc.name not in names]
    ok = server.listening and not missing
    return ok, {
        "status": "ok" if ok else "unavailable",
        "listeners": [{"name": b.name, "protocol": b.protocol, "kind": b.kind, "address": f"{b.host}:{b.port}"}
                      for b in server.bound],
        **({"missing": missing} if missing else {}),
    }


class _Collector:
    """Read at scrape time: sessions now, live traffic, the audit (nothing is counted on the hot path)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []  # names are produced at collect time (auto_describe would call collect at register)

    def collect(self) -> Any:
        m = self.metrics
        server = m.server
        active = GaugeMetricFamily("dbproxy_sessions_active", "Client sessions now, by state: starting (handshake, "
                                   "login) or running (the pipeline runs)", labels=["protocol", "listener", "state"])
        counts = {(lc.protocol, lc.name, state): 0 for lc in server.config.listeners for state in STATES}
        for session in list(server.sessions.values()):
            key = (session.protocol, session.listener, "running" if session.started else "starting")
            counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            active.add_metric(list(key), n)
        yield active

        nbytes = dict(m.ended_bytes)
        messages = dict(m.ended_messages)
        for lc in server.config.listeners:
            for direction in DIRECTIONS:
                nbytes.setdefault((lc.protocol, lc.name, direction), 0)
                messages.setdefault((lc.protocol, lc.name, direction), 0)
        for sid, pipeline in list(m.live.items()):
            session = server.sessions.get(sid)
            if session is None:
                continue
            try:
                live = pipeline_counts(pipeline)
            except Exception:
                continue
            for direction, (n, count) in zip(DIRECTIONS, live):
                key = (session.protocol, session.listener, direction)
                nbytes[key] = nbytes.get(key, 0) + n
                messages[key] = messages.get(key, 0) + count
        b = CounterMetricFamily("dbproxy_bytes", "Bytes the proxy received in each direction (client_to_backend: "
                                "from clients; backend_to_client: from backends)", labels=["protocol", "listener", "direction"])
        for key, n in nbytes.items():
            b.add_metric(list(key), n)
        yield b
        msg = CounterMetricFamily("dbproxy_messages", "Protocol messages (frames) the proxy received in each direction",
                                  labels=["protocol", "listener", "direction"])
        for key, n in messages.items():
            msg.add_metric(list(key), n)
        yield msg

        yield from _audit_families(audit_state(server.recorder))

        up = GaugeMetricFamily("dbproxy_listener_up", "1 when the listener's socket is bound", labels=["listener", "address"])
        for bl in server.bound:
            up.add_metric([bl.name, f"{bl.host}:{bl.port}"], 1)
        yield up
        yield GaugeMetricFamily("dbproxy_start_time_seconds", "When the server started (Unix time)", value=m.started_at)


def _audit_families(a: dict) -> Any:
    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    yield gauge("dbproxy_audit_accepting", "1 while the audit accepts sessions; 0 while it fails closed", int(a["accepting"]))
    yield gauge("dbproxy_audit_worker_up", "1 while the audit worker runs (always 1 with the in-process audit)",
                int(a["worker_up"]))
    yield gauge("dbproxy_audit_queue_frames", "Audit frames (events, tapped bytes) queued in the proxy and not yet "
                "handed to the audit writer", a["queued_frames"])
    yield gauge("dbproxy_audit_unacked_frames", "Audit frames handed over but not yet written by every sink "
                "(the audit worker's acks; in-process: events not yet written)", a["unacked_frames"])
    yield CounterMetricFamily("dbproxy_audit_events_submitted", "Audit events the sessions submitted", value=a["submitted"])
    yield CounterMetricFamily("dbproxy_audit_events_written", "Audit events written to the sinks (the audit worker "
                              "reports it every second)", value=a["written"])
    yield CounterMetricFamily("dbproxy_audit_sink_failures", "Failed sink writes", value=a["sink_failures"])
    if a["worker"]:
        yield gauge("dbproxy_audit_queue_bytes", "Bytes the proxy keeps for the audit worker (queued or not acked); "
                    "past the link's capacity sessions wait", a["queued_bytes"])
        yield gauge("dbproxy_audit_lag_seconds", "Age of the oldest audit write the worker has not acknowledged "
                    "(0: all acked)", a["lag_seconds"])
        yield gauge("dbproxy_audit_worker_queue_events", "Events queued in the audit worker's recorder",
                    a["worker_queued"])
        yield CounterMetricFamily("dbproxy_audit_worker_starts", "Audit worker processes started", value=a["worker_starts"])
        yield CounterMetricFamily("dbproxy_audit_replayed_frames", "Frames handed again to a new audit worker",
                                  value=a["replayed"])
    sinks = a["sinks"]
    families = {
        "pending_events": GaugeMetricFamily("dbproxy_audit_sink_pending_events", "Events in the sink's spool not "
                                            "yet delivered", labels=["sink"]),
        "pending_bytes": GaugeMetricFamily("dbproxy_audit_sink_spool_bytes", "Bytes in the sink's spool not yet "
                                           "delivered", labels=["sink"]),
        "spool_max_bytes": GaugeMetricFamily("dbproxy_audit_sink_spool_max_bytes", "The spool's size limit",
                                             labels=["sink"]),
        "behind_seconds": GaugeMetricFamily("dbproxy_audit_sink_delivery_lag_seconds", "How long the sink has had "
                                            "undelivered events (0: caught up); bounds the oldest one's age",
                                            labels=["sink"]),
        "overflow": GaugeMetricFamily("dbproxy_audit_sink_overflow_events", "Events held in memory because the spool "
                                      "is full (fail_closed)", labels=["sink"]),
        "blocked": GaugeMetricFamily("dbproxy_audit_sink_blocked", "1 while the sink's full spool blocks the audit "
                                     "(fail_closed)", labels=["sink"]),
        "failing": GaugeMetricFamily("dbproxy_audit_sink_failing", "1 while deliveries fail (retrying)",
                                     labels=["sink"]),
    }
    delivered = CounterMetricFamily("dbproxy_audit_sink_delivered", "Events the sink delivered", labels=["sink"])
    dropped = CounterMetricFamily("dbproxy_audit_sink_dropped", "Events a drop_oldest spool dropped", labels=["sink"])
    for s in sinks:
        name = str(s.get("name", ""))
        for key, family in families.items():
            family.add_metric([name], float(s.get(key, 0) or 0))
        delivered.add_metric([name], s.get("delivered", 0))
        dropped.add_metric([name], s.get("dropped", 0))
    yield from families.values()
    yield delivered
    yield dropped
