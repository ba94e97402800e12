"""Sink configuration: every mistake named with its JSON path, good configs build working sinks."""

from __future__ import annotations

import json

import pytest

from dbproxy.audit.sinks import build_sink
from dbproxy.audit.sinks.http import HttpSink
from dbproxy.audit.sinks.jsonl import JsonlSink
from dbproxy.audit.sinks.syslog import SyslogSink
from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.engines import default_registry


def config_with(tmp_path, sinks):
    doc = {
        "listeners": [
            {
                "name": "pg",
                "protocol": "postgres",
                "listen": "127.0.0.1:0",
                "routes": [{"backend": {"address": "127.0.0.1:5432", "auth": {"method": "trust"}}}],
            }
        ],
        "audit": {"sinks": sinks},
    }
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    return str(path)


def errors_of(tmp_path, sinks) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_config(config_with(tmp_path, sinks), default_registry())
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_good_sinks_build(tmp_path):
    (tmp_path / "hec.token").write_text("s3cr3t-token\n")
    cfg = load_config(
        config_with(
            tmp_path,
            [
                {"type": "jsonl", "path": "audit.jsonl", "fsync": "always", "rotate_bytes": 1048576, "gzip": True},
                {"type": "syslog", "name": "siem", "address": "127.0.0.1:6514", "transport": "tls", "ca_file": "hec.token",
                 "facility": "local4", "format": "structured", "spool_dir": "spool/siem", "on_spool_full": "drop_oldest"},
                {"type": "http", "url": "http://127.0.0.1:8088/services/collector/event", "token_file": "hec.token",
                 "spool_dir": "spool/hec", "headers": {"X-Tenant": "a"}, "index": "main"},
            ],
        ),
        default_registry(),
    )
    jsonl, syslog, http = cfg.audit.sinks
    assert jsonl.path == str(tmp_path / "audit.jsonl") and jsonl.params["fsync"] == "always"
    assert syslog.params["facility"] == 20 and syslog.params["spool_dir"] == str(tmp_path / "spool/siem")
    assert syslog.params["on_full"] == "drop_oldest" and http.params["on_full"] == "fail_closed"
    assert "s3cr3t" not in repr(http)
    sink = build_sink(http)
    assert isinstance(sink, HttpSink) and sink.hec_fields["index"] == "main"
    assert dict(sink._headers(b"x"))["Authorization"] == "Splunk s3cr3t-token"
    assert isinstance(build_sink(jsonl), JsonlSink)
    with pytest.raises(Exception):
        build_sink(syslog)  # "hec.token" is no CA certificate: refused at start, not at first send
    ok = build_sink(load_config(config_with(tmp_path, [{"type": "syslog", "address": "localhost:514", "spool_dir": "s"}]), default_registry()).audit.sinks[0])
    assert isinstance(ok, SyslogSink) and ok.transport == "tcp" and ok.formatter.facility == 10


def test_mistakes_are_named(tmp_path):
    errs = errors_of(
        tmp_path,
        [
            {"type": "syslog", "address": "nohost", "transport": "tcp", "ca_file": "missing.pem"},
            {"type": "http", "url": "ftp://x", "format": "hec", "on_spool_full": "panic", "spool_dir": "s", "gzip": "yes"},
            {"type": "jsonl", "path": "a.jsonl", "fsync": "sometimes", "rotate_bytes": 10},
            {"type": "kinesis"},
            {"type": "syslog", "address": "h:1", "spool_dir": "s", "facility": "mail2", "bogus": 1},
        ],
    )
    text = "\n".join(errs)
    assert "audit.sinks[0].address" in text
    assert "audit.sinks[0].ca_file: a readable file" in text
    assert "audit.sinks[0]: a key 'spool_dir'" in text
    assert "audit.sinks[1].url: an http:// or https:// URL" in text
    assert "audit.sinks[1]: \"token_file\" or \"token_env\"" in text
    assert "audit.sinks[1].on_spool_full: one of fail_closed, drop_oldest" in text
    assert "audit.sinks[1].gzip: true or false" in text
    assert "audit.sinks[2].fsync: one of always, interval, never" in text
    assert "audit.sinks[2].rotate_bytes: an integer >= 1024" in text
    assert "audit.sinks[3].type: one of jsonl, syslog, relp, http" in text
    assert "audit.sinks[4].facility: a facility name" in text
    assert "audit.sinks[4].bogus: no key 'bogus'" in text


def test_audit_worker_switch(tmp_path):
    """``audit.worker``: the trail written by the audit worker process (default) or in the proxy's loop."""
    path = config_with(tmp_path, [{"type": "jsonl", "path": "a.jsonl"}])
    assert load_config(path, default_registry()).audit.worker is True
    doc = json.loads(open(path).read())
    doc["audit"]["worker"] = False
    open(path, "w").write(json.dumps(doc))
    assert load_config(path, default_registry()).audit.worker is False
    doc["audit"]["worker"] = "yes"
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(path, default_registry())
    assert [f"{e.path}: {e.expected}" for e in info.value.errors] == ["audit.worker: true or false, got a string"]


def test_relp_sink_and_shipping_options(tmp_path):
    """``relp`` (address, window, ack timeout), syslog's ``confirm`` and http's ``max_in_flight``."""
    from dbproxy.audit.sinks.relp import RelpSink

    cfg = load_config(
        config_with(
            tmp_path,
            [
                {"type": "relp", "name": "rs", "address": "127.0.0.1:2514", "window": 512, "ack_timeout_seconds": 5,
                 "facility": "local3", "spool_dir": "spool/relp"},
                {"type": "syslog", "address": "127.0.0.1:514", "confirm": "none", "spool_dir": "spool/sys"},
                {"type": "http", "url": "http://127.0.0.1:8088/", "format": "ndjson", "max_in_flight": 4, "spool_dir": "spool/h"},
            ],
        ),
        default_registry(),
    )
    relp, syslog, http = (build_sink(s) for s in cfg.audit.sinks)
    assert isinstance(relp, RelpSink) and (relp.host, relp.port, relp.window, relp.ack_timeout) == ("127.0.0.1", 2514, 512, 5)
    assert relp.formatter.facility == 19 and relp.ssl_context is None and relp.name == "rs"
    assert isinstance(syslog, SyslogSink) and syslog.confirm_mode == "none"
    assert isinstance(http, HttpSink) and http.max_in_flight == 4
    default = build_sink(load_config(config_with(tmp_path, [{"type": "syslog", "address": "h:514", "spool_dir": "s2"}]), default_registry()).audit.sinks[0])
    assert default.confirm_mode == "close"  # per-batch connections stay the default: the only confirmed mode
    (tmp_path / "ca.pem").write_text("not checked here")
    errs = "\n".join(
        errors_of(
            tmp_path,
            [
                {"type": "relp", "address": "h:1", "spool_dir": "s", "window": 0, "transport": "tcp"},
                {"type": "relp", "address": "h:1", "spool_dir": "s", "ca_file": "ca.pem", "window": 100000},
                {"type": "syslog", "address": "h:1", "spool_dir": "s", "transport": "udp", "confirm": "none"},
                {"type": "syslog", "address": "h:1", "spool_dir": "s", "confirm": "ack"},
                {"type": "http", "url": "http://h/", "format": "ndjson", "spool_dir": "s", "max_in_flight": 100},
                {"type": "relp", "spool_dir": "s"},
            ],
        )
    )
    assert "audit.sinks[0].window: an integer >= 1" in errs
    assert "audit.sinks[0].transport: no key 'transport'" in errs
    assert "audit.sinks[1].ca_file: no key 'ca_file'" in errs  # RELP over TLS: not offered yet
    assert "audit.sinks[1].window: at most 65536" in errs
    assert "audit.sinks[2].confirm: no \"confirm\" with transport \"udp\"" in errs
    assert "audit.sinks[3].confirm: one of close, none" in errs
    assert "audit.sinks[4].max_in_flight: at most 64" in errs
    assert "audit.sinks[5]: a key 'address'" in errs
