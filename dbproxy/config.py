"""Configuration: JSON route files, validated into frozen attrs objects.

Strategy: one pass over the whole document collects *every* problem as a
``ConfigError(file, json_path, expected)`` (e.g. ``listeners[0].routes[1]
.backend.auth: expected "method" to be one of …``) so an operator fixes a
file in one go; ``check-config`` prints them and ``serve`` refuses to start
on them.  Protocol-specific rules (which auth methods, which match keys) come
from the engine class registered for the listener's protocol, so the core
knows no database.  The validator (typed getters that record errors and go
on) is ``dbproxy.validate``'s; this module is the schema: the frozen types
and the functions that fill them section by section.

Secrets are never inline: ``password_file`` (relative to the config file)
or ``password_env``.  ``SecretRef`` reads them when used, so a rotated file
is picked up without a restart, and its repr never shows the value.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from .buffer import DEFAULT_BUFFER_BUDGET, DEFAULT_MESSAGE_TIMEOUT
from .audit_config import AUDIT_KEYS, validate_sink
from .configtypes import BackendTLS, ListenerTLS, SecretRef, SinkConfig  # noqa: F401  (re-exported)
from .errors import ConfigError, ConfigErrors
from .validate import Validator, join, kind_of, read_json

BACKEND_TLS_MODES = ("disable", "require", "verify-ca", "verify-full")
DEFAULT_SHUTDOWN_GRACE = 10.0




@attrs.frozen
class AuthConfig:
    method: str
    secret: SecretRef | None = None
    params: dict = attrs.field(factory=dict)




@attrs.frozen
class BackendConfig:
    host: str
    port: int
    database: str | None
    user: str | None
    auth: AuthConfig
    tls: BackendTLS
    options: dict = attrs.field(factory=dict)
    # What the engine's ``validate_backend`` made of its own ``backend_keys`` (SSH: login, host_key).
    extra: dict = attrs.field(factory=dict)
    # ``"agent:NODE"``: dialled through an agent of that node (dbproxy.agent); None: directly.
    via: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class RouteConfig:
    name: str
    match: dict
    backend: BackendConfig
    options: dict = attrs.field(factory=dict)




# Listener kinds (dbproxy.listen): how the core opens the socket and what an engine is handed.
#   tcp   a stream per connection (engines may do TLS themselves, in-band or at accept)
#   tls   a stream per connection with TLS terminated by the core (the listener's "tls" section)
#   udp   datagram sessions: one socket, datagrams demultiplexed per peer (or engine key)
#   http  HTTP/1.1 requests parsed by the core (h11), optionally over the core's TLS
LISTENER_KINDS = ("tcp", "tls", "udp", "http")


@attrs.frozen
class UdpOptions:
    """``"udp"`` on a listener of kind udp (dbproxy.listen.udp)."""

    max_sessions: int = 1024
    idle_timeout: float = 60.0  # seconds without a datagram from the peer: the session ends
    queue_datagrams: int = 64  # per session; past it datagrams are dropped and counted (UDP semantics)
    max_datagram_size: int = 65535


@attrs.frozen
class ProxyProtocolOptions:
    """``"proxy_protocol"``: connections from ``trusted`` networks (a load balancer) must open with a
    PROXY protocol v1/v2 header naming the real client (dbproxy.proxyproto); others are served as
    they come, their own address standing."""

    trusted: tuple = ()  # ipaddress networks
    timeout: float = 5.0  # seconds for the header to arrive

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted)


@attrs.frozen
class HttpOptions:
    """``"http"`` on a listener of kind http (dbproxy.listen.http)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    request_timeout: float = 30.0  # from a request's first byte to its last
    keepalive_timeout: float = 60.0  # idle connection between requests


@attrs.frozen
class ListenerConfig:
    name: str
    protocol: str
    host: str
    port: int
    tls: ListenerTLS | None
    routes: tuple[RouteConfig, ...]
    max_message_size: int | None = None
    options: dict = attrs.field(factory=dict)
    handshake_timeout: float | None = None  # seconds; None: the engine default (dbproxy.engine)
    auth: Any = None  # dbproxy.access.ListenerAuth: which client authentication methods
    kind: str = "tcp"  # one of LISTENER_KINDS
    udp: UdpOptions = UdpOptions()
    http: HttpOptions = HttpOptions()
    proxy_protocol: ProxyProtocolOptions | None = None
    # What the engine's ``validate_listener`` returned for its own ``listener_keys`` (SSH: host_key_file).
    extra: dict = attrs.field(factory=dict)




DURABILITY_MODES = ("async", "ack")
WORKER_NICE = 15  # the audit worker's default nice level under durability "async"


@attrs.frozen
class AuditConfig:
    sinks: tuple[SinkConfig, ...] = ()
    queue_size: int = 10_000
    # Write the trail from a separate process (audit.link / audit.worker); False: in the proxy's own loop.
    worker: bool = True
    # "async": a session never waits for its audit; "ack": a statement's completion reaches the
    # client only once its audit record is durable (audit.link acks, one fsync per batch).
    durability: str = "async"
    # The audit worker's nice level (0-19).  Under "async" no session waits for it, so it
    # yields the CPU to the session loops when they want it (default 15); under "ack" every
    # answer waits for it (default 0).
    worker_nice: int = WORKER_NICE
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class BuffersConfig:
    """``"buffers"``: the proxy-wide budget for partly received messages (``dbproxy.buffer.BufferBudget``)."""

    budget_bytes: int = DEFAULT_BUFFER_BUDGET
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT


@attrs.frozen
class LoggingConfig:
    """``"logging"``: the operational log (dbproxy.logs); the command line's flags override it."""

    format: str = "text"  # text | json
    level: str = "INFO"
    levels: dict = attrs.field(factory=dict)  # logger name -> level


@attrs.frozen
class AdminConfig:
    """``"admin"``: the admin listener (/metrics, /healthz, /readyz; dbproxy.admin), loopback by default."""

    host: str = "127.0.0.1"
    port: int = 9090


@attrs.frozen
class Config:
    file: str
    listeners: tuple[ListenerConfig, ...]
    audit: AuditConfig
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # Identity and access (dbproxy.identity / dbproxy.access); None when the section is absent.
    identity: Any = None
    roles: dict | None = None
    limits: Any = None
    buffers: BuffersConfig = BuffersConfig()
    logging: LoggingConfig = LoggingConfig()
    admin: AdminConfig | None = None  # None: no admin listener
    # Proxy processes on the same ports (SO_REUSEPORT) under one supervisor (dbproxy.workers); 1: one process.
    workers: int = 1
    agents: Any = None  # dbproxy.agent.config.AgentsConfig: where agents dial in (None: no agents)

    @classmethod
    def load(cls, path: str, registry: Any = None) -> "Config":
        """Read and validate the config file at ``path`` for ``registry``'s engines (default: every
        engine this install has); raises ``ConfigErrors`` listing every problem."""
        if registry is None:
            from .registry import default_registry  # the composition root that names the engines

            registry = default_registry()
        return load_config(path, registry)


# --------------------------------------------------------------------------- validation

TOP_KEYS = {"listeners", "audit", "shutdown_grace_seconds", "identity", "roles", "limits", "buffers", "logging",
            "admin", "workers", "agents"}
ADMIN_KEYS = {"listen"}
LOGGING_KEYS = {"format", "level", "levels"}
LISTENER_TLS_KEYS = {"cert_file", "key_file", "client_ca_file"}
LISTENER_KEYS = {"name", "protocol", "kind", "listen", "tls", "routes", "max_message_size", "options", "auth",
                 "handshake_timeout_seconds", "udp", "http", "proxy_protocol"}
PROXY_PROTOCOL_KEYS = {"trusted", "timeout_seconds"}
UDP_KEYS = {"max_sessions", "idle_timeout_seconds", "queue_datagrams", "max_datagram_size"}
HTTP_KEYS = {"max_body_bytes", "max_header_bytes", "request_timeout_seconds", "keepalive_timeout_seconds"}
ROUTE_KEYS = {"name", "match", "backend", "options"}
BACKEND_KEYS = {"address", "database", "user", "auth", "tls", "options", "via"}
TLS_KEYS = {"mode", "ca_file", "server_name", "cert_file", "key_file"}


def load_config(path: str, registry: Any) -> Config:
    """Read and validate ``path``; raise ``ConfigErrors`` listing every problem found."""
    v = Validator(path)
    config = _validate(v, read_json(path), registry)
    if v.errors:
        raise ConfigErrors(v.errors)
    assert config is not None
    return config


def load_audit_config(path: str) -> AuditConfig:
    """Only the ``audit`` section of ``path``, validated as ``load_config`` does: what the audit
    worker needs (it re-reads the file when it (re)starts, so sink edits apply), without the
    engine registry the listeners need — the audit side never imports an engine."""
    v = Validator(path)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise ConfigErrors([ConfigError(path, "", "a JSON object at the top level")])
    audit = _audit(v, doc.get("audit", {}), "audit")
    if v.errors:
        raise ConfigErrors(v.errors)
    return audit or AuditConfig()


def _validate(v: Validator, doc: Any, registry: Any) -> Config | None:
    root = v.section(doc, "", TOP_KEYS, "a JSON object at the top level")
    if root is None:
        return None
    listeners_raw = root.get("listeners")
    listeners: list[ListenerConfig] = []
    validated: list[tuple[int, dict, ListenerConfig]] = []
    if not isinstance(listeners_raw, list) or not listeners_raw:
        v.err("listeners", "a non-empty array of listeners")
    else:
        seen_names: set[str] = set()
        seen_addrs: set[tuple[str, int]] = set()
        for i, item in enumerate(listeners_raw):
            lc = _listener(v, item, f"listeners[{i}]", registry)
            if lc is None:
                continue
            if lc.name in seen_names:
                v.err(f"listeners[{i}].name", f"a unique listener name, {lc.name!r} is used twice")
            if lc.port and (lc.host, lc.port) in seen_addrs:
                v.err(f"listeners[{i}].listen", f"a unique address, {lc.host}:{lc.port} is used twice")
            seen_names.add(lc.name)
            seen_addrs.add((lc.host, lc.port))
            listeners.append(lc)
            validated.append((i, item, lc))
    from .access import validate_access

    identity, roles, limits, auths = validate_access(v, root, validated, registry)
    listeners = [attrs.evolve(lc, auth=auths.get(lc.name)) for lc in listeners]
    audit = _audit(v, root.get("audit", {}), "audit")
    grace = v.number(root, "shutdown_grace_seconds", "")
    buffers = _buffers(v, root["buffers"], "buffers") if "buffers" in root else BuffersConfig()
    logging_config = _logging(v, root["logging"], "logging") if "logging" in root else LoggingConfig()
    admin = _admin(v, root["admin"], "admin", listeners) if "admin" in root else None
    workers = _workers(v, root, validated, audit)
    agents = _agents(v, root, validated, identity)
    if agents is not None and workers > 1:
        # An agent's link lands on one process, and only that process could dial through it.
        v.err("workers", f"1 with an \"agents\" section (agents link to one process), got {workers}")
    return Config(
        file=v.file,
        listeners=tuple(listeners),
        audit=audit or AuditConfig(),
        shutdown_grace=DEFAULT_SHUTDOWN_GRACE if grace is None else grace,
        identity=identity,
        roles=roles,
        limits=limits,
        buffers=buffers or BuffersConfig(),
        logging=logging_config or LoggingConfig(),
        admin=admin,
        workers=workers,
        agents=agents,
    )


def _workers(v: Validator, root: dict, validated: list, audit: Any) -> int:
    """``"workers": N`` (dbproxy.workers): N processes share the listeners' ports, so each port must be
    fixed (port 0 would give each process its own), and one audit chain needs the audit worker."""
    n = v.integer(root, "workers", "", minimum=1)
    if n is None or n == 1:
        return 1
    for i, _, lc in validated:
        if not lc.port:
            v.err(f"listeners[{i}].listen", f"a fixed port with \"workers\": {n} (every process binds the same "
                  f"port; port 0 would give each its own)")
    if audit is not None and not audit.worker:
        v.err("audit.worker", f"true with \"workers\": {n} (the processes share one audit chain, written "
              f"by the audit worker)")
    return n


def _agents(v: Validator, root: dict, validated: list, identity: Any) -> Any:
    """The ``agents`` section, and every backend ``via`` an agent needs it (dbproxy.agent.config)."""
    from .agent.config import validate_agents

    agents = validate_agents(v, root["agents"], "agents") if "agents" in root else None
    if "agents" in root and getattr(identity, "token", None) is None:
        v.err("agents", "an \"identity.token\" section too: agents authenticate with node tokens it signs")
    if "agents" not in root:
        for i, _item, lc in validated:
            for j, route in enumerate(lc.routes):
                if route.backend.via is not None:
                    v.err(f"listeners[{i}].routes[{j}].backend.via",
                          "an \"agents\" section (where agents dial in) for a backend reached through an agent")
    return agents


def _admin(v: Validator, item: Any, path: str, listeners: list) -> AdminConfig | None:
    d = v.section(item, path, ADMIN_KEYS)
    if d is None:
        return None
    if "listen" not in d:
        return AdminConfig()
    addr = v.address(d, "listen", path)
    if addr is None:
        return None
    host, port = addr
    for lc in listeners:
        wildcard = {"0.0.0.0", "::", ""}
        if port and lc.port == port and (lc.host == host or lc.host in wildcard or host in wildcard):
            v.err(join(path, "listen"), f"an address no listener uses, {host}:{port} is listener {lc.name!r}'s")
            break
    return AdminConfig(host=host, port=port)


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _logging(v: Validator, item: Any, path: str) -> LoggingConfig | None:
    d = v.section(item, path, LOGGING_KEYS)
    if d is None:
        return None
    fmt = v.string(d, "format", path, required=False, choices=("text", "json")) or "text"
    level = v.string(d, "level", path, required=False, choices=LOG_LEVELS) or "INFO"
    levels: dict = {}
    if "levels" in d:
        lp = join(path, "levels")
        raw = v.obj(d["levels"], lp, "an object of logger name -> level")
        for name, lvl in (raw or {}).items():
            if lvl not in LOG_LEVELS:
                v.err(f"{lp}[{name!r}]", f"one of {', '.join(LOG_LEVELS)}, got {lvl!r}")
            else:
                levels[name] = lvl
    return LoggingConfig(format=fmt, level=level, levels=levels)


BUFFERS_KEYS = {"budget_bytes", "message_timeout_seconds"}
# Below one read (256 KiB) a budget would refuse ordinary multi-read messages.
MIN_BUFFER_BUDGET = 1024 * 1024
MIN_MESSAGE_TIMEOUT = 1.0


def _buffers(v: Validator, item: Any, path: str) -> BuffersConfig | None:
    d = v.section(item, path, BUFFERS_KEYS)
    if d is None:
        return None
    budget = v.integer(d, "budget_bytes", path, minimum=MIN_BUFFER_BUDGET)
    timeout = v.number(d, "message_timeout_seconds", path, minimum=MIN_MESSAGE_TIMEOUT)
    return BuffersConfig(
        budget_bytes=DEFAULT_BUFFER_BUDGET if budget is None else budget,
        message_timeout=DEFAULT_MESSAGE_TIMEOUT if timeout is None else timeout,
    )


def _listener(v: Validator, item: Any, path: str, registry: Any) -> ListenerConfig | None:
    d = v.obj(item, path)  # its keys are checked once the engine (and its own keys) is known
    if d is None:
        return None
    name = v.string(d, "name", path)
    engine_cls = None
    protocol = v.string(d, "protocol", path, choices=tuple(registry.names()))
    if protocol is not None:
        engine_cls = registry.get(protocol)
    # An engine may own a few top-level listener keys (``listener_keys``, validated by its
    # ``validate_listener``, whose returned dict becomes ``ListenerConfig.extra``).
    v.unknown_keys(d, LISTENER_KEYS | set(getattr(engine_cls, "listener_keys", ())), path)
    addr = v.address(d, "listen", path)
    tls = None
    if "tls" in d:
        tp = join(path, "tls")
        td = v.section(d["tls"], tp, LISTENER_TLS_KEYS)
        if td is not None:
            cert = v.file_path(td, "cert_file", tp)
            key = v.file_path(td, "key_file", tp)
            ca = v.file_path(td, "client_ca_file", tp, required=False)
            if cert and key:
                tls = ListenerTLS(cert, key, ca)
    max_size = v.integer(d, "max_message_size", path, minimum=1024)
    handshake_timeout = v.number(d, "handshake_timeout_seconds", path)
    if handshake_timeout is not None and not 0 < handshake_timeout <= 3600:
        v.err(f"{path}.handshake_timeout_seconds", f"a number of seconds in (0, 3600], got {handshake_timeout}")
        handshake_timeout = None
    ceiling = getattr(engine_cls, "max_message_size_limit", None)
    if max_size is not None and ceiling is not None and max_size > ceiling:
        # Past the protocol's own ceiling no peer could send or accept such a message:
        # the value can only be a mistake (and would let one connection buffer that much).
        v.err(join(path, "max_message_size"),
              f"at most {ceiling} bytes, the {protocol} protocol's limit ({engine_cls.max_message_size_limit_source}), "
              f"got {max_size}")
        max_size = None
    options = d.get("options", {})
    if v.obj(options, join(path, "options")) is None:
        options = {}
    routes: list[RouteConfig] = []
    routes_raw = d.get("routes")
    if not isinstance(routes_raw, list) or not routes_raw:
        v.err(join(path, "routes"), "a non-empty array of routes")
    else:
        for j, r in enumerate(routes_raw):
            rc = _route(v, r, f"{path}.routes[{j}]", j, engine_cls)
            if rc is not None:
                routes.append(rc)
    kind, udp, http = _listener_kind(v, d, path, engine_cls, protocol, tls)
    proxy_protocol = _proxy_protocol(v, d, path, kind) if "proxy_protocol" in d else None
    extra: dict = {}
    if engine_cls is not None and hasattr(engine_cls, "validate_listener"):
        extra = engine_cls.validate_listener(v, d, path) or {}
    if name is None or protocol is None or addr is None or kind is None:
        return None
    return ListenerConfig(
        name=name,
        protocol=protocol,
        host=addr[0],
        port=addr[1],
        tls=tls,
        routes=tuple(routes),
        max_message_size=max_size,
        options=options,
        handshake_timeout=handshake_timeout,
        kind=kind,
        udp=udp,
        http=http,
        proxy_protocol=proxy_protocol,
        extra=extra,
    )


def _proxy_protocol(v: Validator, d: dict, path: str, kind: str | None) -> ProxyProtocolOptions | None:
    pp = join(path, "proxy_protocol")
    section = v.section(d["proxy_protocol"], pp, PROXY_PROTOCOL_KEYS)
    if section is None:
        return None
    if kind == "udp":
        v.err(pp, "no \"proxy_protocol\" on a listener of kind \"udp\" (PROXY headers are for stream listeners)")
        return None
    trusted_raw = section.get("trusted")
    tp = join(pp, "trusted")
    if "trusted" not in section:
        # Trusting everyone would let any client write its own address into the audit trail.
        v.err(pp, "a key 'trusted': the load balancers' networks (CIDR, e.g. \"10.0.0.0/24\")")
        return None
    if not isinstance(trusted_raw, list) or not trusted_raw:
        v.err(tp, f"a non-empty array of networks in CIDR form, got {kind_of(trusted_raw)}")
        return None
    networks = []
    for i, item in enumerate(trusted_raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False) if isinstance(item, str) else None)
        except ValueError:
            networks.append(None)
        if networks[-1] is None:
            v.err(f"{tp}[{i}]", f"an IP network in CIDR form (\"10.0.0.0/24\", \"::1/128\"), got {item!r}")
    timeout = v.number(section, "timeout_seconds", pp, minimum=0.01)
    if any(n is None for n in networks):
        return None
    return ProxyProtocolOptions(trusted=tuple(networks), timeout=5.0 if timeout is None else timeout)


def _listener_kind(v: Validator, d: dict, path: str, engine_cls: Any, protocol: str | None,
                   tls: ListenerTLS | None) -> tuple[str | None, UdpOptions, HttpOptions]:
    """``kind`` (default tcp), checked against what the engine serves, and the kind's own section."""
    kind = v.string(d, "kind", path, required=False, choices=LISTENER_KINDS) if "kind" in d else "tcp"
    served = tuple(getattr(engine_cls, "listener_kinds", ("tcp",))) if engine_cls is not None else None
    if kind is not None and served is not None and kind not in served:
        v.err(join(path, "kind"), f"a kind the {protocol} engine serves ({', '.join(served)}), got {kind!r}")
    if kind == "tls" and "tls" not in d:
        v.err(path, "a \"tls\" section (cert_file, key_file) for kind \"tls\"")
    if kind == "udp" and "tls" in d:
        v.err(join(path, "tls"), "no \"tls\" on a listener of kind \"udp\" (DTLS is not supported)")
    for section in ("udp", "http"):
        if section in d and kind != section:
            v.err(join(path, section), f"only on a listener of kind \"{section}\", this one is {kind or 'tcp'!r}")
    udp, http = UdpOptions(), HttpOptions()
    if kind == "udp" and "udp" in d:
        up = join(path, "udp")
        ud = v.section(d["udp"], up, UDP_KEYS)
        if ud is not None:
            idle = v.number(ud, "idle_timeout_seconds", up, minimum=0.01)
            udp = UdpOptions(
                max_sessions=v.integer(ud, "max_sessions", up) or udp.max_sessions,
                idle_timeout=udp.idle_timeout if idle is None else idle,
                queue_datagrams=v.integer(ud, "queue_datagrams", up) or udp.queue_datagrams,
                max_datagram_size=_at_most(v, v.integer(ud, "max_datagram_size", up, minimum=512), 65535,
                                           join(up, "max_datagram_size"), "the largest UDP payload")
                or udp.max_datagram_size,
            )
    if kind == "http" and "http" in d:
        hp = join(path, "http")
        hd = v.section(d["http"], hp, HTTP_KEYS)
        if hd is not None:
            request_timeout = v.number(hd, "request_timeout_seconds", hp, minimum=0.01)
            keepalive = v.number(hd, "keepalive_timeout_seconds", hp, minimum=0.01)
            max_body = v.integer(hd, "max_body_bytes", hp, minimum=0)
            http = HttpOptions(
                max_body_bytes=http.max_body_bytes if max_body is None else max_body,
                max_header_bytes=v.integer(hd, "max_header_bytes", hp, minimum=1024) or http.max_header_bytes,
                request_timeout=http.request_timeout if request_timeout is None else request_timeout,
                keepalive_timeout=http.keepalive_timeout if keepalive is None else keepalive,
            )
    return kind, udp, http


def _at_most(v: Validator, value: int | None, ceiling: int, path: str, what: str) -> int | None:
    if value is not None and value > ceiling:
        v.err(path, f"at most {ceiling} ({what}), got {value}")
        return None
    return value


def _route(v: Validator, item: Any, path: str, index: int, engine_cls: Any) -> RouteConfig | None:
    d = v.section(item, path, ROUTE_KEYS)
    if d is None:
        return None
    name = v.string(d, "name", path, required=False) or f"route{index}"
    match: dict[str, str] = {}
    if "match" in d:
        md = v.obj(d["match"], join(path, "match"))
        if md is not None:
            allowed = set(getattr(engine_cls, "match_keys", ())) if engine_cls else set()
            for key, glob in md.items():
                if engine_cls is not None and key not in allowed:
                    v.err(join(join(path, "match"), key), f"a match key of this protocol ({', '.join(sorted(allowed))})")
                elif not isinstance(glob, str) or not glob:
                    v.err(join(join(path, "match"), key), f"a glob string, got {kind_of(glob)}")
                else:
                    match[key] = glob
    backend = None
    if "backend" not in d:
        v.err(path, "a key 'backend'")
    else:
        backend = _backend(v, d["backend"], join(path, "backend"), engine_cls)
    options = d.get("options", {}) if isinstance(d.get("options", {}), dict) else {}
    if backend is None:
        return None
    return RouteConfig(name=name, match=match, backend=backend, options=options)


def _backend(v: Validator, item: Any, path: str, engine_cls: Any) -> BackendConfig | None:
    from .agent.config import validate_via

    d = v.section(item, path, BACKEND_KEYS | set(getattr(engine_cls, "backend_keys", ())))
    if d is None:
        return None
    addr = v.address(d, "address", path)
    database = v.string(d, "database", path, required=False)
    user = v.string(d, "user", path, required=False)
    auth = None
    methods = tuple(getattr(engine_cls, "auth_methods", ())) if engine_cls else None
    if "auth" not in d:
        v.err(path, "a key 'auth' (an object with a \"method\")")
    else:
        ap = join(path, "auth")
        ad = v.obj(d["auth"], ap)
        if ad is not None:
            method = v.string(ad, "method", ap, choices=methods or None)
            if method is not None:
                needs_secret = method in getattr(engine_cls, "password_methods", ())
                secret = v.secret(ad, ap, required=needs_secret)
                params = {k: val for k, val in ad.items() if k not in {"method", "password_file", "password_env"}}
                if engine_cls is not None and hasattr(engine_cls, "validate_auth"):
                    validated = engine_cls.validate_auth(v, method, ad, ap)
                    params = validated if validated is not None else params
                elif params:
                    for k in params:
                        v.err(join(ap, k), f"no key {k!r} for method {method}")
                auth = AuthConfig(method=method, secret=secret, params=params)
    tls = BackendTLS()
    if "tls" in d:
        tp = join(path, "tls")
        td = v.section(d["tls"], tp, TLS_KEYS)
        if td is not None:
            mode = v.string(td, "mode", tp, choices=BACKEND_TLS_MODES) or "disable"
            ca = v.file_path(td, "ca_file", tp, required=mode in ("verify-ca", "verify-full"))
            server_name = v.string(td, "server_name", tp, required=False)
            cert = v.file_path(td, "cert_file", tp, required=False)
            key = v.file_path(td, "key_file", tp, required=cert is not None)
            tls = BackendTLS(mode=mode, ca_file=ca, server_name=server_name, cert_file=cert, key_file=key)
    options = d.get("options", {}) if isinstance(d.get("options", {}), dict) else {}
    # The engine's own backend keys (``backend_keys``): its ``validate_backend`` returns ``extra``.
    extra = engine_cls.validate_backend(v, d, path) or {} if hasattr(engine_cls, "validate_backend") else {}
    if addr is None or auth is None:
        return None
    try:
        ipaddress.ip_address(addr[0])
    except ValueError:
        pass  # host names are fine; resolution happens at connect time
    return BackendConfig(
        host=addr[0], port=addr[1], database=database, user=user, auth=auth, tls=tls, options=options, extra=extra,
        via=validate_via(v, d, path),
    )


def _audit(v: Validator, item: Any, path: str) -> AuditConfig | None:

    d = v.section(item, path, AUDIT_KEYS)
    if d is None:
        return None
    sinks: list[SinkConfig] = []
    raw = d.get("sinks", [])
    if not isinstance(raw, list):
        v.err(join(path, "sinks"), f"an array of sinks, got {kind_of(raw)}")
        raw = []
    for i, s in enumerate(raw):
        sink = validate_sink(v, s, f"{path}.sinks[{i}]", i)
        if sink is not None:
            sinks.append(sink)
    queue = v.integer(d, "queue_size", path, minimum=16) or 10_000
    worker = v.boolean(d, "worker", path, default=True)
    durability = v.string(d, "durability", path, required=False, choices=DURABILITY_MODES) or "async"
    nice = _at_most(v, v.integer(d, "worker_nice", path, minimum=0), 19, join(path, "worker_nice"), "a nice level")
    if nice is None:
        nice = WORKER_NICE if durability == "async" else 0
    extra = {k: val for k, val in d.items() if k not in AUDIT_KEYS}
    return AuditConfig(sinks=tuple(sinks), queue_size=queue, worker=worker, durability=durability,
                       worker_nice=nice, options=extra)
