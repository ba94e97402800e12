"""The admin listener: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

Strategy: the core's own HTTP/1.1 loop (``dbproxy.listen.http.serve_http``,
h11) serves it, with this module as its "engine" (``handle_http_request``);
the body of ``/metrics`` is prometheus-client's encoder over the server's own
registry (``dbproxy.metrics``), in the format the scraper's ``Accept`` asks
for (``choose_encoder``: OpenMetrics, else the text format 0.0.4).
Configured by the top-level ``"admin": {"listen": "127.0.0.1:9090"}``
(loopback by default: the numbers name listeners, users' protocols and the
audit's state; put it elsewhere only behind a firewall).  Admin requests are
not client sessions: they are neither audited nor counted.

- ``/healthz``: 200 while the process runs and every configured listener is
  bound (a JSON list of them), else 503.
- ``/readyz``: 200 ``{"ready": true}`` while new sessions would be served;
  503 with ``{"ready": false, "reason": …}`` while the audit fails closed (a
  fail_closed sink's spool is full), the audit worker is down, or the server
  is stopping — a load balancer then sends clients elsewhere.
- ``/api/nodes``: the connected outbound agents per node (address, version,
  last heartbeat, round trip, open streams, bytes; ``dbproxy.agent.hub``);
  ``/api/connections``: every open stream through them (node, target,
  session id, bytes each way).  Both ``{"nodes": []}`` / ``{"connections": []}``
  when the proxy serves no agents.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio
from prometheus_client.exposition import choose_encoder

from .config import HttpOptions
from .listen.http import HTTPResponse, serve_http
from .metrics import health, readiness

log = logging.getLogger("dbproxy.admin")

# Scrapes and probes are small and quick: tight bounds keep a stuck client from holding a task.
ADMIN_HTTP = HttpOptions(max_body_bytes=64 * 1024, max_header_bytes=16 * 1024, request_timeout=10.0,
                         keepalive_timeout=30.0)


@attrs.define(eq=False)
class _AdminSession:
    """What ``serve_http`` needs of a session (an id for its log lines, details)."""

    id: str
    details: dict = attrs.field(factory=dict)


class AdminHandler:
    def __init__(self, server: Any) -> None:
        self.server = server

    async def handle_http_request(self, session: Any, request: Any) -> HTTPResponse:
        path = request.path
        if request.method not in ("GET", "HEAD"):
            return HTTPResponse.json(405, {"error": {"code": 405, "message": "only GET and HEAD"}},
                                     (("allow", "GET, HEAD"),))
        if path == "/metrics":
            # The format the scraper asks for (Accept: OpenMetrics or text 1.0.0), else text 0.0.4,
            # as prometheus-client's own exposition server negotiates it.
            encode, content_type = choose_encoder(request.header("accept") or "")
            return HTTPResponse(200, (("content-type", content_type),), encode(self.server.metrics.registry))
        if path == "/healthz":
            ok, detail = health(self.server)
            return HTTPResponse.json(200 if ok else 503, detail)
        if path == "/readyz":
            ok, reason = readiness(self.server)
            return HTTPResponse.json(200 if ok else 503, {"ready": ok, "reason": reason})
        if path in ("/api/nodes", "/api/connections"):
            hub = getattr(self.server, "agents", None)
            if hub is None:
                return HTTPResponse.json(200, {path.rsplit("/", 1)[1]: []})
            return HTTPResponse.json(200, hub.status() if path == "/api/nodes" else hub.connections())
        return HTTPResponse.json(404, {"error": {"code": 404, "message": f"no {path} here: /metrics, /healthz, /readyz, "
                                                 "/api/nodes, /api/connections"}})


async def serve_admin(server: Any, host: str, port: int, *, handler: Any = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin endpoints until cancelled; ``task_status.started((host, port))`` once bound.
    ``handler``: another set of endpoints (the supervisor's over every process, dbproxy.workers)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    address = (sockname[0], sockname[1])
    log.info("admin listener (/metrics, /healthz, /readyz) on %s:%d", *address)
    handler = handler or AdminHandler(server)
    counter = 0

    async def serve_one(stream: trio.SocketStream) -> None:
        nonlocal counter
        counter += 1
        try:
            await serve_http(handler, _AdminSession(f"admin-{counter}"), stream, ADMIN_HTTP)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started(address)
        await trio.serve_listeners(serve_one, listeners, handler_nursery=nursery)
