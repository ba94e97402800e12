"""The Kafka sink's config: good configs build a KafkaSink with an idempotent producer's settings,
every mistake is named by file, JSON path and expectation; the record key and seq header per event."""

from __future__ import annotations

import json

import orjson
import pytest

from dbproxy.audit.sinks import build_sink
from dbproxy.audit.sinks.kafka import KafkaSink
from dbproxy.config import load_audit_config
from dbproxy.errors import ConfigErrors


def _load(tmp_path, sink: dict):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"audit": {"sinks": [sink]}}))
    return str(path), lambda: load_audit_config(str(path))


def errors_of(tmp_path, sink: dict) -> list[str]:
    path, load = _load(tmp_path, sink)
    with pytest.raises(ConfigErrors) as info:
        load()
    assert all(e.file == path for e in info.value.errors)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_good_config_builds_an_idempotent_producer(tmp_path):
    _, load = _load(tmp_path, {"type": "kafka", "name": "k", "bootstrap_servers": ["k1:9092", "[::1]:9093"],
                               "topic": "audit.trail-1", "key": "sid", "chain": "proxy-a", "compression": "zstd",
                               "delivery_timeout_seconds": 5, "spool_dir": "spool", "batch_max_events": 100})
    (cfg,) = load().sinks
    sink = build_sink(cfg)
    assert isinstance(sink, KafkaSink)
    assert (sink.name, sink.bootstrap_servers, sink.topic, sink.key, sink.chain) == (
        "k", "k1:9092,[::1]:9093", "audit.trail-1", "sid", "proxy-a")
    assert sink.batch_max_events == 100
    conf = sink.producer_config()
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["bootstrap.servers"] == "k1:9092,[::1]:9093" and conf["message.timeout.ms"] == 5000
    assert conf["compression.type"] == "zstd"
    # The producer accepts these settings as they are.
    from confluent_kafka import Producer

    Producer(conf)


def test_defaults(tmp_path):
    _, load = _load(tmp_path, {"type": "kafka", "bootstrap_servers": "k1:9092, k2:9092", "topic": "t",
                               "spool_dir": "spool"})
    sink = build_sink(load().sinks[0])
    assert (sink.bootstrap_servers, sink.key, sink.compression) == ("k1:9092,k2:9092", "chain", "none")
    assert sink.name == "kafka0" and sink.on_full == "fail_closed"


@pytest.mark.parametrize("sink, expected", [
    ({"topic": "t", "spool_dir": "s"}, "audit.sinks[0].bootstrap_servers: the cluster's \"host:port\" list"),
    ({"bootstrap_servers": "k1", "topic": "t", "spool_dir": "s"}, "audit.sinks[0].bootstrap_servers: \"host:port\" entries"),
    ({"bootstrap_servers": [], "topic": "t", "spool_dir": "s"}, "audit.sinks[0].bootstrap_servers: \"host:port\" entries"),
    ({"bootstrap_servers": "k1:0", "topic": "t", "spool_dir": "s"}, "audit.sinks[0].bootstrap_servers: \"host:port\" entries"),
    ({"bootstrap_servers": "k1:9092", "spool_dir": "s"}, "audit.sinks[0]: a key 'topic'"),
    ({"bootstrap_servers": "k1:9092", "topic": "a/b", "spool_dir": "s"}, "audit.sinks[0].topic: a Kafka topic name"),
    ({"bootstrap_servers": "k1:9092", "topic": "..", "spool_dir": "s"}, "audit.sinks[0].topic: a Kafka topic name"),
    ({"bootstrap_servers": "k1:9092", "topic": "x" * 250, "spool_dir": "s"}, "audit.sinks[0].topic: a Kafka topic name"),
    ({"bootstrap_servers": "k1:9092", "topic": "t", "key": "user", "spool_dir": "s"}, "audit.sinks[0].key: "),
    ({"bootstrap_servers": "k1:9092", "topic": "t", "compression": "brotli", "spool_dir": "s"}, "audit.sinks[0].compression: "),
    ({"bootstrap_servers": "k1:9092", "topic": "t", "delivery_timeout_seconds": 0.1, "spool_dir": "s"},
     "audit.sinks[0].delivery_timeout_seconds: "),
    ({"bootstrap_servers": "k1:9092", "topic": "t"}, "audit.sinks[0]: a key 'spool_dir'"),
    ({"bootstrap_servers": "k1:9092", "topic": "t", "spool_dir": "s", "acks": "1"}, "audit.sinks[0].acks: "),
])
def test_mistakes_are_named(tmp_path, sink, expected):
    got = errors_of(tmp_path, {"type": "kafka", **sink})
    assert any(g.startswith(expected) for g in got), got


def _sink(tmp_path, **kw) -> KafkaSink:
    spool = tmp_path / f"spool-{kw.get('key', 'chain')}"  # one spool per sink (each locks its own)
    return KafkaSink(bootstrap_servers="127.0.0.1:9", topic="t", chain="proxy-a", name="k", spool_dir=str(spool), **kw)


def test_record_keeps_the_line_and_keys_it(tmp_path):
    line = orjson.dumps({"seq": 42, "event": "db.session.query", "sid": "s-1", "hash": "h"})
    value, key, headers = _sink(tmp_path)._record(line)
    assert value is line and key == b"proxy-a" and headers == [("seq", b"42")]
    by_sid = _sink(tmp_path, key="sid")
    assert by_sid._record(line)[1] == b"s-1"
    # Events outside a session keep the chain's key with key "sid".
    assert by_sid._record(orjson.dumps({"seq": 1, "event": "audit.start"}))[1] == b"proxy-a"
    assert _sink(tmp_path, key="none")._record(line)[1] is None


def test_sasl_ssl_config(tmp_path, monkeypatch):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "pw").write_text("s3cr3t-pw\n")
    _, load = _load(tmp_path, {"type": "kafka", "bootstrap_servers": "k1:9093", "topic": "t", "spool_dir": "spool",
                               "security_protocol": "SASL_SSL", "ca_file": "ca.pem", "sasl_mechanism": "SCRAM-SHA-512",
                               "sasl_username": "audit", "sasl_password_file": "pw"})
    (cfg,) = load().sinks
    assert "s3cr3t" not in repr(cfg)
    conf = build_sink(cfg).producer_config()
    assert (conf["security.protocol"], conf["ssl.ca.location"], conf["sasl.mechanisms"], conf["sasl.username"],
            conf["sasl.password"]) == ("SASL_SSL", str(tmp_path / "ca.pem"), "SCRAM-SHA-512", "audit", "s3cr3t-pw")
    monkeypatch.setenv("KAFKA_PW", "env-pw")
    _, load = _load(tmp_path, {"type": "kafka", "bootstrap_servers": "k1:9093", "topic": "t", "spool_dir": "spool2",
                               "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                               "sasl_username": "audit", "sasl_password_env": "KAFKA_PW"})
    conf = build_sink(load().sinks[0]).producer_config()
    assert conf["sasl.password"] == "env-pw" and "ssl.ca.location" not in conf


@pytest.mark.parametrize("sink, expected", [
    ({"security_protocol": "TLS"}, "audit.sinks[0].security_protocol: "),
    ({"ca_file": "ca.pem"}, "audit.sinks[0].ca_file: no TLS keys with security_protocol 'PLAINTEXT'"),
    ({"sasl_username": "a"}, "audit.sinks[0].sasl_username: no SASL keys with security_protocol 'PLAINTEXT'"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "a", "sasl_password_file": "ca.pem"},
     "audit.sinks[0].sasl_mechanism: "),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password_file": "ca.pem"},
     "audit.sinks[0]: a key 'sasl_username'"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "a"},
     "audit.sinks[0]: one of \"sasl_password_file\" or \"sasl_password_env\""),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "a", "sasl_password_env": "NO_SUCH_VAR_X"},
     "audit.sinks[0].sasl_password_env: environment variable NO_SUCH_VAR_X"),
    ({"security_protocol": "SSL", "cert_file": "ca.pem"}, "audit.sinks[0]: both \"cert_file\" and \"key_file\""),
])
def test_security_mistakes_are_named(tmp_path, sink, expected):
    (tmp_path / "ca.pem").write_text("x")
    got = errors_of(tmp_path, {"type": "kafka", "bootstrap_servers": "k1:9092", "topic": "t", "spool_dir": "s", **sink})
    assert any(g.startswith(expected) for g in got), got
