"""Audit sinks: construction (``build_sink``; their config is validated by ``dbproxy.audit_config``).

Any number of sinks at once; each gets every event, in ``seq`` order:

    {"type": "jsonl",  "path": "audit.jsonl", "fsync": "interval", "rotate_bytes": 104857600, "gzip": true}
    {"type": "syslog", "address": "siem:6514", "transport": "tls", "ca_file": "ca.pem",
     "spool_dir": "/var/lib/dbproxy/spool/siem", "on_spool_full": "fail_closed"}
    {"type": "relp",   "address": "siem:2514", "window": 1024, "spool_dir": "/var/lib/dbproxy/spool/relp"}
    {"type": "http",   "url": "https://splunk:8088/services/collector/event", "format": "hec",
     "token_file": "hec.token", "spool_dir": "/var/lib/dbproxy/spool/hec"}

    {"type": "pg_table", "dsn_file": "audit-db.dsn", "table": "dbproxy_audit", "spool_dir": "/var/lib/dbproxy/spool/pg"}
    {"type": "kafka", "bootstrap_servers": "kafka1:9092", "topic": "dbproxy-audit", "spool_dir": "/var/lib/dbproxy/spool/kafka"}

Network sinks (syslog, relp, http, pg_table, kafka) all take the spool keys: ``spool_dir``
(required), ``spool_max_bytes``, ``on_spool_full`` (``fail_closed`` |
``drop_oldest``), ``batch_max_events``, ``batch_max_bytes``,
``retry_initial_seconds``, ``retry_max_seconds``, ``shutdown_flush_seconds``,
``batch_linger_seconds`` (wait this long after the first event so a batch can gather).
"""

from __future__ import annotations

from dbproxy.configtypes import SinkConfig


def _spool_kw(cfg: SinkConfig) -> dict:
    p = cfg.params
    kw: dict = {"name": cfg.name, "spool_dir": p["spool_dir"], "on_full": p["on_full"]}
    for key in ("spool_max_bytes", "batch_max_events", "batch_max_bytes", "retry_initial_seconds", "retry_max_seconds", "shutdown_flush_seconds", "batch_linger_seconds"):
        if key in p:
            kw[key] = p[key]
    return kw


def _tls_context(p: dict):
    from dbproxy.configtypes import BackendTLS
    from dbproxy.tls import client_context

    return client_context(BackendTLS(mode="verify-full", ca_file=p.get("ca_file"), cert_file=p.get("cert_file"), key_file=p.get("key_file")))


def build_sink(cfg: SinkConfig):
    p = cfg.params
    if cfg.type == "jsonl":
        from .jsonl import JsonlSink

        kw = {k: p[k] for k in ("fsync", "fsync_interval_seconds", "rotate_bytes", "rotate_seconds", "gzip") if k in p}
        return JsonlSink(path=cfg.path, name=cfg.name, **kw)
    if cfg.type == "syslog":
        from .syslog import Rfc5424Formatter, SyslogSink

        fmt = {k: p[k] for k in ("facility", "app_name", "hostname", "sd_id", "utf8_bom") if k in p}
        fmt["body"] = p.get("body", "json")
        extra = {}
        if "confirm_timeout_seconds" in p:
            extra["confirm_timeout"] = p["confirm_timeout_seconds"]
        if "connect_timeout_seconds" in p:
            extra["connect_timeout"] = p["connect_timeout_seconds"]
        if "confirm" in p:
            extra["confirm"] = p["confirm"]
        return SyslogSink(
            host=p["host"],
            port=p["port"],
            transport=p["transport"],
            formatter=Rfc5424Formatter(**fmt),
            ssl_context=_tls_context(p) if p["transport"] == "tls" else None,
            server_name=p.get("server_name"),
            **extra,
            **_spool_kw(cfg),
        )
    if cfg.type == "relp":
        from .relp import RelpSink
        from .syslog import Rfc5424Formatter

        fmt = {k: p[k] for k in ("facility", "app_name", "hostname", "sd_id", "utf8_bom") if k in p}
        fmt["body"] = p.get("body", "json")
        extra = {key: p[name] for key, name in (("window", "window"), ("ack_timeout", "ack_timeout_seconds"), ("connect_timeout", "connect_timeout_seconds")) if name in p}
        return RelpSink(
            host=p["host"],
            port=p["port"],
            formatter=Rfc5424Formatter(**fmt),
            **extra,
            **_spool_kw(cfg),
        )
    if cfg.type == "http":
        from .http import HttpSink

        https = p["url"].startswith("https://")
        extra = {k: p[k] for k in ("timeout_seconds", "max_in_flight") if k in p}
        return HttpSink(
            url=p["url"],
            format=p["format"],
            token=p.get("token"),
            gzip=p["gzip"],
            headers=p.get("headers"),
            ssl_context=_tls_context(p) if https else None,
            server_name=p.get("server_name"),
            hec_fields=p.get("hec_fields"),
            **extra,
            **_spool_kw(cfg),
        )
    if cfg.type == "pg_table":
        from .postgres import PostgresSink

        extra = {k: p[k] for k in ("table", "chain", "connect_timeout") if k in p}
        return PostgresSink(dsn=p["dsn"], **extra, **_spool_kw(cfg))
    if cfg.type == "kafka":
        from .kafka import KafkaSink

        extra = {k: p[k] for k in ("key", "chain", "compression", "delivery_timeout", "security_protocol", "ca_file", "cert_file",
                                   "key_file", "sasl_mechanism", "sasl_username", "sasl_password") if k in p}
        return KafkaSink(bootstrap_servers=p["bootstrap_servers"], topic=p["topic"], **extra, **_spool_kw(cfg))
    raise ValueError(f"unknown sink type {cfg.type!r}")
