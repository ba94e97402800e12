"""Validation of the config's ``audit`` section: the sinks (jsonl, syslog, relp, http) and
their spools, each problem named by file, JSON path and expectation (see
``dbproxy.validate``, whose ``Validator`` these functions take as ``v``).  Building the
sinks from the result is ``audit.sinks.build_sink``'s job.
"""

from __future__ import annotations

import os
from typing import Any

from .configtypes import SecretRef, SinkConfig
from .validate import join

SINK_TYPES = ("jsonl", "syslog", "relp", "http", "pg_table", "kafka")
# Keys allowed directly under "audit" in a config file.
AUDIT_KEYS = {"sinks", "queue_size", "worker", "durability", "worker_nice"}

COMMON_KEYS = {"type", "name"}
JSONL_KEYS = {"path", "fsync", "fsync_interval_seconds", "rotate_bytes", "rotate_seconds", "gzip"}
SPOOL_KEYS = {
    "spool_dir",
    "spool_max_bytes",
    "on_spool_full",
    "batch_max_events",
    "batch_max_bytes",
    "retry_initial_seconds",
    "retry_max_seconds",
    "shutdown_flush_seconds",
    "batch_linger_seconds",
}
TLS_KEYS = {"ca_file", "server_name", "cert_file", "key_file"}
SYSLOG_KEYS = {
    "address", "transport", "facility", "app_name", "hostname", "format", "sd_id", "utf8_bom",
    "confirm_timeout_seconds", "connect_timeout_seconds", "confirm",
} | TLS_KEYS
# No TLS yet: the client side exists (RelpSink(ssl_context=...)) but has not been checked
# against imrelp's TLS (librelp/GnuTLS), so the config does not offer it.
RELP_KEYS = {
    "address", "facility", "app_name", "hostname", "format", "sd_id", "utf8_bom",
    "window", "ack_timeout_seconds", "connect_timeout_seconds",
}
POSTGRES_KEYS = {"dsn_file", "dsn_env", "table", "chain", "connect_timeout_seconds"}
KAFKA_KEYS = {
    "bootstrap_servers", "topic", "key", "chain", "compression", "delivery_timeout_seconds", "security_protocol",
    "ca_file", "cert_file", "key_file", "sasl_mechanism", "sasl_username", "sasl_password_file", "sasl_password_env",
}
HTTP_KEYS = {
    "url", "format", "token_file", "token_env", "gzip", "headers", "timeout_seconds",
    "index", "source", "sourcetype", "host", "max_in_flight",
} | TLS_KEYS


def validate_sink(v: Any, item: Any, path: str, index: int) -> SinkConfig | None:
    d = v.obj(item, path)
    if d is None:
        return None
    stype = v.string(d, "type", path, choices=SINK_TYPES)
    name = v.string(d, "name", path, required=False) or f"{stype}{index}"
    if stype is None:
        return None
    before = len(v.errors)
    if stype == "jsonl":
        v.unknown_keys(d, COMMON_KEYS | JSONL_KEYS, path)
        spath = v.file_path(d, "path", path, must_exist=False)
        params = _jsonl(v, d, path)
        if spath is None or len(v.errors) > before:
            return None
        return SinkConfig(type=stype, name=name, path=spath, params=params)
    if stype == "syslog":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | SYSLOG_KEYS, path)
        params = _syslog(v, d, path)
    elif stype == "relp":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | RELP_KEYS, path)
        params = _relp(v, d, path)
    elif stype == "pg_table":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | POSTGRES_KEYS, path)
        params = _postgres(v, d, path)
    elif stype == "kafka":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | KAFKA_KEYS, path)
        params = _kafka(v, d, path)
    else:
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | HTTP_KEYS, path)
        params = _http(v, d, path)
    params.update(_spool(v, d, path))
    if len(v.errors) > before:
        return None
    return SinkConfig(type=stype, name=name, path=None, params=params)


def _jsonl(v: Any, d: dict, path: str) -> dict:
    params: dict = {"fsync": v.string(d, "fsync", path, required=False, choices=("always", "interval", "never")) or "interval"}
    interval = v.number(d, "fsync_interval_seconds", path, minimum=0.01)
    if interval is not None:
        params["fsync_interval_seconds"] = interval
    rotate_bytes = v.integer(d, "rotate_bytes", path, minimum=1024)
    if rotate_bytes is not None:
        params["rotate_bytes"] = rotate_bytes
    rotate_seconds = v.number(d, "rotate_seconds", path, minimum=1.0)
    if rotate_seconds is not None:
        params["rotate_seconds"] = rotate_seconds
    params["gzip"] = v.boolean(d, "gzip", path)
    return params


def _spool(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    spool_dir = v.file_path(d, "spool_dir", path, must_exist=False)
    if spool_dir is not None:
        params["spool_dir"] = spool_dir
    params["on_full"] = v.string(d, "on_spool_full", path, required=False, choices=("fail_closed", "drop_oldest")) or "fail_closed"
    _bounded(params, v.integer, d, path, (("spool_max_bytes", 16 * 1024), ("batch_max_events", 1), ("batch_max_bytes", 1024)))
    _bounded(params, v.number, d, path, (("retry_initial_seconds", 0.01), ("retry_max_seconds", 0.01), ("shutdown_flush_seconds", 0.0), ("batch_linger_seconds", 0.0)))
    return params


def _bounded(params: dict, getter: Any, d: dict, path: str, limits: tuple) -> None:
    """``params[key]`` for each (key, minimum) present in ``d``, checked by ``getter``
    (``v.integer`` / ``v.number``); absent keys keep the sink's own default."""
    for key, minimum in limits:
        value = getter(d, key, path, minimum=minimum)
        if value is not None:
            params[key] = value


def _tls(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    for key in ("ca_file", "cert_file", "key_file"):
        f = v.file_path(d, key, path, required=False)
        if f is not None:
            params[key] = f
    if ("cert_file" in d) != ("key_file" in d):
        v.err(path, "both \"cert_file\" and \"key_file\" (a client certificate) or neither")
    server_name = v.string(d, "server_name", path, required=False)
    if server_name is not None:
        params["server_name"] = server_name
    return params


def _syslog(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    addr = v.address(d, "address", path)
    if addr is not None:
        params["host"], params["port"] = addr
    transport = v.string(d, "transport", path, required=False, choices=("tcp", "tls", "udp")) or "tcp"
    params["transport"] = transport
    tls = _tls(v, d, path)
    if transport != "tls" and tls:
        v.err(path, f"no TLS keys ({', '.join(sorted(tls))}) with transport {transport!r}")
    params.update(tls)
    confirm = v.string(d, "confirm", path, required=False, choices=("close", "none"))
    if confirm is not None:
        if transport == "udp":
            v.err(join(path, "confirm"), "no \"confirm\" with transport \"udp\" (datagrams are never confirmed)")
        params["confirm"] = confirm
    _message_format(v, d, path, params)
    _bounded(params, v.number, d, path, (("confirm_timeout_seconds", 0.1), ("connect_timeout_seconds", 0.1)))
    return params


def _relp(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    addr = v.address(d, "address", path)
    if addr is not None:
        params["host"], params["port"] = addr
    _message_format(v, d, path, params)
    _bounded(params, v.integer, d, path, (("window", 1),))
    if params.get("window", 0) > 65536:
        v.err(join(path, "window"), f"at most 65536 unacknowledged frames, got {params['window']}")
    _bounded(params, v.number, d, path, (("ack_timeout_seconds", 0.1), ("connect_timeout_seconds", 0.1)))
    return params


def _message_format(v: Any, d: dict, path: str, params: dict) -> None:
    """The RFC 5424 message keys syslog and relp share."""
    if "facility" in d:
        from dbproxy.audit.sinks.syslog import FACILITIES

        fac = d["facility"]
        if isinstance(fac, str) and fac in FACILITIES:
            params["facility"] = FACILITIES[fac]
        elif isinstance(fac, int) and not isinstance(fac, bool) and 0 <= fac <= 23:
            params["facility"] = fac
        else:
            v.err(join(path, "facility"), f"a facility name ({', '.join(FACILITIES)}) or 0-23, got {fac!r}")
    for key in ("app_name", "hostname", "sd_id"):
        value = v.string(d, key, path, required=False)
        if value is not None:
            params[key] = value
    params["body"] = v.string(d, "format", path, required=False, choices=("json", "structured")) or "json"
    params["utf8_bom"] = v.boolean(d, "utf8_bom", path)


def _http(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    url = v.string(d, "url", path)
    if url is not None:
        if not url.startswith(("http://", "https://")):
            v.err(join(path, "url"), f"an http:// or https:// URL, got {url!r}")
        params["url"] = url
    params["format"] = v.string(d, "format", path, required=False, choices=("hec", "ndjson")) or "hec"
    if "token_file" in d and "token_env" in d:
        v.err(path, "only one of \"token_file\" or \"token_env\"")
    elif "token_file" in d:
        f = v.file_path(d, "token_file", path)
        if f is not None:
            params["token"] = SecretRef(file=f)
    elif "token_env" in d:
        env = v.string(d, "token_env", path)
        if env is not None:
            if env not in os.environ:
                v.err(join(path, "token_env"), f"environment variable {env} to be set")
            params["token"] = SecretRef(env=env)
    elif params["format"] == "hec":
        v.err(path, "\"token_file\" or \"token_env\" (the HEC token) for format \"hec\"")
    params["gzip"] = v.boolean(d, "gzip", path, default=True)
    if "headers" in d:
        headers = v.obj(d["headers"], join(path, "headers"))
        if headers is not None:
            for k, val in headers.items():
                if not isinstance(val, str) or k.lower() in ("authorization", "content-length", "content-encoding", "host"):
                    v.err(join(join(path, "headers"), k), "a string value for a header the sink does not set itself")
            params["headers"] = {k: val for k, val in headers.items() if isinstance(val, str)}
    params.update(_tls(v, d, path))
    value = v.number(d, "timeout_seconds", path, minimum=0.1)
    if value is not None:
        params["timeout_seconds"] = value
    _bounded(params, v.integer, d, path, (("max_in_flight", 1),))
    if params.get("max_in_flight", 0) > 64:
        v.err(join(path, "max_in_flight"), f"at most 64 concurrent requests, got {params['max_in_flight']}")
    hec = {k: d[k] for k in ("index", "source", "sourcetype", "host") if v.string(d, k, path, required=False)}
    if hec:
        params["hec_fields"] = hec
    return params


def _postgres(v: Any, d: dict, path: str) -> dict:
    """The PostgreSQL table sink (audit/sinks/postgres.py): a DSN from a file or the environment
    (it may carry a password), a table name, the chain's name."""
    params: dict = {}
    try:
        import psycopg  # noqa: F401
    except ImportError:
        v.err(join(path, "type"), "a sink whose library is installed: \"pg_table\" needs psycopg "
                                  "(pip install 'dbproxy[audit-postgres]')")
    if ("dsn_file" in d) == ("dsn_env" in d):
        v.err(path, "one of \"dsn_file\" or \"dsn_env\" (the libpq connection string; it may hold a password)")
    elif "dsn_file" in d:
        f = v.file_path(d, "dsn_file", path)
        if f is not None:
            params["dsn"] = SecretRef(file=f)
    else:
        env = v.string(d, "dsn_env", path)
        if env is not None:
            if env not in os.environ:
                v.err(join(path, "dsn_env"), f"environment variable {env} to be set")
            params["dsn"] = SecretRef(env=env)
    table = v.string(d, "table", path, required=False)
    if table is not None:
        from dbproxy.audit.sinks.postgres import TABLE_NAME

        if not TABLE_NAME.match(table):
            v.err(join(path, "table"), f"a table name (letters, digits, _; optionally schema.table), got {table!r}")
        params["table"] = table
    chain = v.string(d, "chain", path, required=False)
    if chain is not None:
        params["chain"] = chain
    timeout = v.number(d, "connect_timeout_seconds", path, minimum=1.0)
    if timeout is not None:
        params["connect_timeout"] = timeout
    return params


def _kafka(v: Any, d: dict, path: str) -> dict:
    """The Kafka sink (audit/sinks/kafka.py): the cluster's bootstrap servers, a topic, the record key."""
    from dbproxy.audit.sinks.kafka import COMPRESSION, KEYS, SASL_MECHANISMS, SECURITY_PROTOCOLS

    params: dict = {}
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        v.err(join(path, "type"), "a sink whose library is installed: \"kafka\" needs confluent-kafka "
                                  "(pip install 'dbproxy[audit-kafka]')")
    servers = d.get("bootstrap_servers")
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",")]
    if servers is None:
        v.err(join(path, "bootstrap_servers"), "the cluster's \"host:port\" list (a string, comma-separated, or an array)")
    elif not isinstance(servers, list) or not servers or not all(isinstance(s, str) and _host_port(s) for s in servers):
        v.err(join(path, "bootstrap_servers"), f"\"host:port\" entries with a port 1-65535, got {d.get('bootstrap_servers')!r}")
    else:
        params["bootstrap_servers"] = ",".join(servers)
    topic = v.string(d, "topic", path)
    if topic is not None:
        # Kafka's own rule (Topic.validate): 1-249 of [a-zA-Z0-9._-], not "." or "..".
        if not (0 < len(topic) <= 249 and all(c.isascii() and (c.isalnum() or c in "._-") for c in topic)) or topic in (".", ".."):
            v.err(join(path, "topic"), f"a Kafka topic name (1-249 of letters, digits, '.', '_', '-'), got {topic!r}")
        params["topic"] = topic
    params["key"] = v.string(d, "key", path, required=False, choices=KEYS) or "chain"
    chain = v.string(d, "chain", path, required=False)
    if chain is not None:
        params["chain"] = chain
    params["compression"] = v.string(d, "compression", path, required=False, choices=COMPRESSION) or "none"
    timeout = v.number(d, "delivery_timeout_seconds", path, minimum=1.0)
    if timeout is not None:
        params["delivery_timeout"] = timeout
    protocol = v.string(d, "security_protocol", path, required=False, choices=SECURITY_PROTOCOLS) or "PLAINTEXT"
    params["security_protocol"] = protocol
    for key in ("ca_file", "cert_file", "key_file"):
        if key in d:
            if not protocol.endswith("SSL"):
                v.err(join(path, key), f"no TLS keys with security_protocol {protocol!r} (SSL or SASL_SSL)")
            f = v.file_path(d, key, path)
            if f is not None:
                params[key] = f
    if ("cert_file" in d) != ("key_file" in d):
        v.err(path, "both \"cert_file\" and \"key_file\" (a client certificate) or neither")
    sasl_keys = [k for k in ("sasl_mechanism", "sasl_username", "sasl_password_file", "sasl_password_env") if k in d]
    if protocol.startswith("SASL_"):
        params["sasl_mechanism"] = v.string(d, "sasl_mechanism", path, choices=SASL_MECHANISMS)
        params["sasl_username"] = v.string(d, "sasl_username", path)
        if ("sasl_password_file" in d) == ("sasl_password_env" in d):
            v.err(path, f"one of \"sasl_password_file\" or \"sasl_password_env\" with security_protocol {protocol!r}")
        elif "sasl_password_file" in d:
            f = v.file_path(d, "sasl_password_file", path)
            if f is not None:
                params["sasl_password"] = SecretRef(file=f)
        else:
            env = v.string(d, "sasl_password_env", path)
            if env is not None:
                if env not in os.environ:
                    v.err(join(path, "sasl_password_env"), f"environment variable {env} to be set")
                params["sasl_password"] = SecretRef(env=env)
    elif sasl_keys:
        v.err(join(path, sasl_keys[0]), f"no SASL keys with security_protocol {protocol!r} (SASL_PLAINTEXT or SASL_SSL)")
    return params


def _host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) <= 65535)
