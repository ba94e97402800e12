"""The Kafka audit sink against a real Apache Kafka 4.1 (KRaft, one broker+controller node from Maven
Central, scripts/peers/kafka_server.py): every event's exact stamped line arrives in the topic, in
``seq`` order, equal to the JSONL file's lines, and the consumed lines verify as a chain; the broker
killed mid-stream and restarted on its data loses nothing (the disk spool holds the events meanwhile)."""

from __future__ import annotations

import json

import pytest

from dbproxy.audit.chain import verify_files
from tests.support import (
    ProxyProcess,
    chained_events,
    deliver_all,
    note_calls,
    peer_missing,
    pg_connect,
    pg_scram_config,
    read_audit,
    sink_from_config,
    wait_until,
)

pytestmark = pytest.mark.integration

TOPIC = "dbproxy-audit"


@pytest.fixture
def kafka(tmp_path):
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        peer_missing("confluent-kafka (pip install -e '.[test]')")
    from scripts.peers.kafka_server import installed, lib_dir, start_kafka

    if not installed():
        peer_missing(f"no Kafka jars in {lib_dir()}: run scripts/install/kafka.sh")
    server = start_kafka(tmp_path / "kafka")
    yield server
    server.stop()


def _consume(kafka, until: int, timeout: float = 60.0) -> list:
    """Every record of the topic's one partition from the start, until ``until`` distinct seqs are seen."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": "audit-test",
                         "enable.auto.commit": False, "log_level": 0})
    consumer.assign([TopicPartition(TOPIC, 0, OFFSET_BEGINNING)])
    records, seqs = [], set()
    try:
        def more():
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                records.append(msg)
                seqs.add(json.loads(msg.value())["seq"])
            return len(seqs) >= until
        wait_until(more, timeout=timeout, interval=0, what=f"{until} events in the topic")
    finally:
        consumer.close()
    return records


def _high_watermark(kafka) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": "audit-probe", "log_level": 0})
    try:
        return consumer.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)[1]
    finally:
        consumer.close()


def test_trail_lands_in_kafka_through_a_broker_outage(pg, kafka, tmp_path):
    kafka.create_topic(TOPIC)
    config = pg_scram_config(pg, tmp_path, {"sinks": [
        {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
        {"type": "kafka", "name": "events", "bootstrap_servers": kafka.bootstrap_servers, "topic": TOPIC,
         "chain": "test-chain", "spool_dir": str(tmp_path / "spool"), "delivery_timeout_seconds": 2,
         "retry_initial_seconds": 0.1, "retry_max_seconds": 1},
    ]})
    proxy = ProxyProcess(tmp_path, config).start()
    try:
        with pg_connect(proxy) as conn:
            for i in range(20):
                conn.execute("select %s::int", (i,))
        # Mid-stream: the sink has delivered to the broker already when it dies.
        wait_until(lambda: _high_watermark(kafka) > 0, timeout=30, what="the first records in the topic")
        kafka.kill()
        with pg_connect(proxy) as conn:
            for i in range(20, 30):
                conn.execute("select %s::int", (i,))
        n_outage = len(read_audit(tmp_path / "audit.jsonl"))
        # The sink noticed the outage (the events of the last session wait in its spool).
        wait_until(lambda: "audit sink events: delivery failed" in proxy.log_text(), timeout=30,
                   what="the sink's delivery failure during the outage")
        kafka.start()  # the same node, ports and data
        with pg_connect(proxy) as conn:
            conn.execute("select 'after'")
        trail = wait_until(lambda: (lambda t: t if t[-1]["event"] == "db.session.end" and len(t) > n_outage else None)(
            read_audit(tmp_path / "audit.jsonl")), what="the last session's end")
        records = _consume(kafka, len(trail))
    finally:
        proxy.stop()
    jsonl_lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    # At-least-once: a batch whose acknowledgement was lost in the outage may arrive twice; never
    # a record ahead of its predecessor (a gap filled later would be out of order).
    lines, top = [], 0
    for msg in records:
        seq = json.loads(msg.value())["seq"]
        assert seq <= top + 1, f"seq {seq} arrived before seq {top + 1}"
        assert msg.key() == b"test-chain" and dict(msg.headers())["seq"] == str(seq).encode()
        if seq == top + 1:
            lines.append(msg.value().decode())
            top = seq
    assert len(lines) >= len(trail)
    # Every event, in order, the exact line of the JSONL file (the bytes its hash covers).
    assert lines[:len(trail)] == jsonl_lines[:len(trail)]
    executes = [line for line in lines if '"db.session.postgres.statements.execute"' in line]
    assert len(executes) >= 30
    # The consumed lines verify as a trail of their own.
    exported = tmp_path / "from-kafka.jsonl"
    exported.write_text("".join(line + "\n" for line in lines))
    result = verify_files([str(exported)])
    assert result.chain_ok and result.events == len(lines), result


def test_config_errors_name_the_path(tmp_path):
    from dbproxy.config import load_audit_config
    from dbproxy.errors import ConfigErrors

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"audit": {"sinks": [
        {"type": "kafka", "bootstrap_servers": "kafka1", "topic": "audit trail", "key": "user",
         "spool_dir": str(tmp_path / "s")}]}}))
    with pytest.raises(ConfigErrors) as info:
        load_audit_config(str(path))
    got = [f"{e.path}: {e.expected}" for e in info.value.errors]
    assert any(g.startswith("audit.sinks[0].bootstrap_servers: \"host:port\" entries") for g in got), got
    assert any(g.startswith("audit.sinks[0].topic: a Kafka topic name") for g in got), got
    assert "audit.sinks[0].key: one of chain, sid, none, got 'user'" in got, got
    assert all(str(path) in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


@pytest.fixture
def kafka_sasl_ssl(tmp_path):
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        peer_missing("confluent-kafka (pip install -e '.[test]')")
    from scripts.peers.kafka_server import installed, lib_dir, start_kafka

    if not installed():
        peer_missing(f"no Kafka jars in {lib_dir()}: run scripts/install/kafka.sh")
    server = start_kafka(tmp_path / "kafka", sasl_ssl=True)
    yield server
    server.stop()


def test_sasl_ssl_with_a_password_fixed_while_the_spool_waits(pg, kafka_sasl_ssl, tmp_path):
    """TLS (the broker's certificate checked against the test CA) and SASL PLAIN: a wrong password
    fails delivery, the events wait in the spool; the password file fixed, the next retry's new
    producer reads it and every event arrives.  The password is never in the proxy's log."""
    kafka = kafka_sasl_ssl
    kafka.create_topic(TOPIC)
    ((user, password),) = kafka.sasl_users.items()
    secret = tmp_path / "kafka.password"
    secret.write_text("wrong-" + password + "\n")
    config = pg_scram_config(pg, tmp_path, {"sinks": [
        {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
        {"type": "kafka", "name": "events", "bootstrap_servers": kafka.sasl_bootstrap_servers, "topic": TOPIC,
         "security_protocol": "SASL_SSL", "ca_file": str(kafka.ca_file), "sasl_mechanism": "PLAIN",
         "sasl_username": user, "sasl_password_file": str(secret),
         "chain": "test-chain", "spool_dir": str(tmp_path / "spool"), "delivery_timeout_seconds": 2,
         "retry_initial_seconds": 0.1, "retry_max_seconds": 1},
    ]})
    proxy = ProxyProcess(tmp_path, config).start()
    try:
        with pg_connect(proxy) as conn:
            conn.execute("select 1")
        wait_until(lambda: "audit sink events: delivery failed" in proxy.log_text(), timeout=30,
                   what="the sink's delivery failure with the wrong password")
        assert _high_watermark(kafka) == 0
        assert "Authentication failed" in proxy.log_text()  # the cause, from librdkafka's error callback
        secret.write_text(password + "\n")
        with pg_connect(proxy) as conn:
            conn.execute("select 'after'")
        trail = wait_until(lambda: (lambda t: t if t[-1]["event"] == "db.session.end" and len(t) > 4 else None)(
            read_audit(tmp_path / "audit.jsonl")), what="the last session's end")
        records = _consume(kafka, len(trail))
    finally:
        proxy.stop()
    lines = {}
    for msg in records:
        lines.setdefault(json.loads(msg.value())["seq"], msg.value().decode())
    jsonl_lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [lines[s] for s in range(1, len(trail) + 1)] == jsonl_lines[:len(trail)]
    assert password not in proxy.log_text() and password not in (tmp_path / "audit.jsonl").read_text()


def test_a_backlog_goes_in_one_batch(kafka, tmp_path):
    """A backlog of 3000 events (an outage's, or a busy proxy's) is produced as one batch with the
    sink's default batch size: each batch costs a spool read and thread hops in the audit worker,
    and batches of 500 shipped 2098 events/s against 6248/s recorded (scripts/bench/pg --sink
    kafka).  The records arrive once each, in order."""

    kafka.create_topic(TOPIC)
    sink = sink_from_config(tmp_path, {"type": "kafka", "bootstrap_servers": kafka.bootstrap_servers, "topic": TOPIC,
                                       "chain": "test-chain", "spool_dir": str(tmp_path / "spool")})
    batches = note_calls(sink, "_produce_sync")  # the real producing, counted
    events = chained_events(3000)
    deliver_all(sink, events)
    assert batches == [3000]
    records = _consume(kafka, 3000)
    assert [json.loads(m.value()) for m in records] == events
    assert _high_watermark(kafka) == 3000


def test_batches_are_pipelined_and_arrive_in_order(kafka, tmp_path):
    """Batches are produced while earlier ones still await their delivery reports (several in
    flight, no flush per batch): one at a time, each batch waited for a round trip to the
    in-sync replicas before the next was produced.  The idempotent producer keeps them in order:
    every record once, in ``seq`` order."""

    kafka.create_topic(TOPIC)
    sink = sink_from_config(tmp_path, {"type": "kafka", "bootstrap_servers": kafka.bootstrap_servers, "topic": TOPIC,
                                       "chain": "test-chain", "spool_dir": str(tmp_path / "spool"),
                                       "batch_max_events": 100})
    # The real producing; how many batches were submitted and not yet confirmed.
    in_flight = note_calls(sink, "_produce_sync", lambda payloads: sink._in_flight)
    events = chained_events(1000)
    deliver_all(sink, events)
    assert len(in_flight) == 10 and max(in_flight) > 1, in_flight
    records = _consume(kafka, 1000)
    assert [json.loads(m.value())["seq"] for m in records] == list(range(1, 1001))
    assert _high_watermark(kafka) == 1000


def test_nothing_lands_behind_a_refused_record(kafka, tmp_path):
    """A record the producer refuses (larger than ``message.max.bytes``) stops the sink at it:
    batches already read behind it (pipelined) must not be produced, or they would land ahead
    of it.  The sink keeps retrying it (a SIEM-side fix, or an operator, must intervene);
    the topic holds only what came before it."""
    import trio

    kafka.create_topic(TOPIC)
    sink = sink_from_config(tmp_path, {"type": "kafka", "bootstrap_servers": kafka.bootstrap_servers, "topic": TOPIC,
                                       "chain": "test-chain", "spool_dir": str(tmp_path / "spool"),
                                       "batch_max_events": 1, "retry_initial_seconds": 0.1, "retry_max_seconds": 0.3})
    events = chained_events(40, pad=lambda seq: 1_200_000 if seq == 2 else 100)

    async def main():
        await sink.write_batch(events)
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await trio.sleep(5)  # a dozen attempts
            assert sink.failing and sink.delivered == 1
            nursery.cancel_scope.cancel()
        await sink.aclose()

    trio.run(main)
    assert _high_watermark(kafka) == 1
    records = _consume(kafka, 1)
    assert [json.loads(m.value())["seq"] for m in records] == [1]
