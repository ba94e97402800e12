"""Apache Kafka sink (``"type": "kafka"``): each event's exact stamped line as one record of a topic, behind the disk spool.

    {"type": "kafka", "bootstrap_servers": "kafka1:9092,kafka2:9092", "topic": "dbproxy-audit",
     "key": "chain", "spool_dir": "/var/lib/dbproxy/spool/kafka"}

Record value: the event's JSON line exactly as the recorder stamped it (the
bytes its ``hash`` covers, without the newline), so a consumer's lines verify
with ``dbproxy audit verify`` like the JSONL file.  Record key (``key``):
``chain`` (default: the chain's name, config ``chain``, default the host name —
one key, so the whole chain lands in one partition in ``seq`` order), ``sid``
(the session id, the chain name for events outside a session: a session's
events stay in order within their partition, sessions spread over
partitions), or ``none``.  A ``seq`` header carries the event's sequence
number in decimal.

Strategy: the spooled base writes each batch to the disk spool first and
delivers from it in order (outages, restarts).  It is pipelined: ``submit``
produces a batch's records in a worker thread (confluent-kafka/librdkafka is
synchronous there; the audit worker's trio loop never blocks), without a
flush, on one persistent *idempotent* producer (``enable.idempotence=true``,
``acks=all``: librdkafka's own retries neither reorder nor duplicate, across
batches too); ``confirm`` serves the producer's events in short polls until
every record of that batch has its delivery report.  Up to 4 batches are in
flight and the spool cursor moves in the base's own task.  Batches are large
by default (``batch_max_events`` 5000, ``batch_max_bytes`` 8 MiB; the spool
keys override them).  One 500-event batch at a time — produce, ``flush`` (a
round trip to the in-sync replicas), cursor commit — shipped 2098 events/s
against 6248/s recorded while the broker used 5 % of a core
(scripts/bench/README.md, "Network audit sinks").  Any failed report
fails the batch with the count of leading records that did land
(``DeliveryFailed.delivered``), so the spool commits those and, after its
backoff, re-sends the rest and every batch behind it.  ``delivery_timeout_seconds``
(librdkafka ``message.timeout.ms``) bounds how long a record may wait for the
cluster: during an outage the batch fails after that long, and the spool
retries.  The producer lives as long as batches succeed; a failed batch
drops it (purging anything still queued: records of unknown fate must not
be delivered behind the spool's back later), and the retry makes a new one —
which also picks up a rotated SASL password or a changed DNS name.

At-least-once: a record the broker stored whose acknowledgement was lost (a
timeout during an outage, a proxy crash between the delivery report and the
spool's commit) is produced again by the retry, so **a consumer can see an event
twice**.  Never out of order within a key, never missing.  Consumers drop
duplicates by ``seq`` (per chain) — the ``seq``/``prev_hash``/``hash`` fields
make each line self-identifying; ``dbproxy audit verify`` reports a duplicate
as a chain break.

TLS and SASL (``security_protocol`` ``SSL`` / ``SASL_PLAINTEXT`` / ``SASL_SSL``):
``ca_file`` (else the system's CAs), ``cert_file``/``key_file`` for a client
certificate, the broker's host name checked against its certificate;
``sasl_mechanism`` ``PLAIN`` / ``SCRAM-SHA-256`` / ``SCRAM-SHA-512`` with
``sasl_username`` and the password from ``sasl_password_file`` or
``sasl_password_env`` — read when the producer is made, never logged.

librdkafka's own log lines (connection refused every backoff during an outage,
…) go to the ``dbproxy.audit.kafka.client`` logger at DEBUG: the sink reports
failures once itself, as every spooled sink does.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import orjson
import trio

from .spooled import DeliveryFailed, SpooledSink

log = logging.getLogger("dbproxy.audit.kafka")

KEYS = ("chain", "sid", "none")
COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
BATCH_MAX_EVENTS = 5000  # default batch_max_events / batch_max_bytes for this sink (see __init__)
BATCH_MAX_BYTES = 8 * 1024 * 1024


class _ClientLog:
    """librdkafka's log callback target (confluent-kafka calls ``log(level, fmt, *args)``),
    every line at DEBUG: during an outage it logs each reconnect attempt as an error."""

    _log = logging.getLogger("dbproxy.audit.kafka.client")

    def log(self, level: int, msg: str, *args: Any, **kw: Any) -> None:
        self._log.debug(msg, *args)


class _Batch:
    """One produced batch: its records' delivery reports (``True`` or librdkafka's error), set
    by callbacks that run in whichever worker thread serves the producer's events."""

    def __init__(self, producer: Any, n: int) -> None:
        self.producer = producer
        self.reports: list[Any] = [None] * n
        self.produced = 0  # records handed to the producer (fewer if one was refused)
        self.landed = 0  # reports received
        self.refused: str | None = None

    def callback(self, i: int):
        def on_delivery(err: Any, _msg: Any) -> None:
            self.reports[i] = err if err is not None else True
            self.landed += 1
        return on_delivery


class KafkaSink(SpooledSink):
    kind = "kafka"
    pipelined = True

    def __init__(self, *, bootstrap_servers: str, topic: str, key: str = "chain", chain: str | None = None,
                 compression: str = "none", delivery_timeout: float = 30.0, security_protocol: str = "PLAINTEXT",
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 sasl_mechanism: str | None = None, sasl_username: str | None = None, sasl_password: Any = None,
                 **spool: Any) -> None:
        # Big batches: each costs a spool read and thread hops in the busy audit worker; one
        # 500-event batch at a time (with a flush each) shipped 2098 events/s against 6248/s
        # recorded (scripts/bench/pg --sink kafka, 2026-12-06).
        spool.setdefault("batch_max_events", BATCH_MAX_EVENTS)
        spool.setdefault("batch_max_bytes", BATCH_MAX_BYTES)
        super().__init__(**spool)
        if key not in KEYS:
            raise ValueError(f"key must be one of {KEYS}")
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {COMPRESSION}")
        if security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}")
        self.security_protocol = security_protocol
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.sasl_mechanism, self.sasl_username = sasl_mechanism, sasl_username
        self._sasl_password = sasl_password  # a SecretRef: read when the producer is made, never logged
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.key = key
        self.chain = chain or socket.gethostname()
        self.compression = compression
        self.delivery_timeout = delivery_timeout
        self._producer: Any = None
        self._client_error_text: str | None = None  # librdkafka's last error during the current batch
        self._limiter = trio.CapacityLimiter(1)  # one thread at a time drives the producer
        self._refused: str | None = None  # why the current producer refused a record (it stops producing)
        # Pipelined: batches are produced while earlier ones await their reports (no flush per
        # batch); the idempotent producer keeps them in order.  Up to 4 batches in flight.
        self.max_in_flight = 4

    def producer_config(self) -> dict:
        """librdkafka's settings (with the SASL password: pass to the Producer only, never log)."""
        timeout_ms = int(self.delivery_timeout * 1000)
        conf = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": "dbproxy-audit",
            "enable.idempotence": True,
            "acks": "all",
            # How long a record may wait for the cluster before its report says it failed: the
            # flush below returns by then, and the spool retries.
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": min(timeout_ms, 30000),
            "linger.ms": 5,
            "compression.type": self.compression,
            "logger": _ClientLog(),
            "error_cb": self._client_error,
            "security.protocol": self.security_protocol,
        }
        for key, value in (("ssl.ca.location", self.ca_file), ("ssl.certificate.location", self.cert_file),
                           ("ssl.key.location", self.key_file)):
            if value is not None:
                conf[key] = value
        if self.security_protocol.startswith("SASL_"):
            conf["sasl.mechanisms"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self._sasl_password.reveal() if self._sasl_password is not None else ""
        return conf

    # -- the producer (in the worker thread) ---------------------------------------------
    def _client_error(self, err: Any) -> None:
        # Served from poll/flush in the worker thread: connection refused, SASL authentication
        # failed, TLS handshake errors — the cause behind a "Message timed out" report.
        self._client_error_text = err.str()

    def _produce_sync(self, payloads: list[bytes]) -> _Batch:
        """Produce a batch's records, in order, without waiting for them (``confirm`` does)."""
        from confluent_kafka import KafkaException, Producer

        if self._producer is None:
            try:
                self._producer = Producer(self.producer_config())
            except KafkaException as exc:
                raise DeliveryFailed(f"Kafka: {exc.args[0].str() if exc.args else exc}") from None
        producer = self._producer
        records = [self._record(p) for p in payloads]  # here, not in the audit worker's event loop
        batch = _Batch(producer, len(records))
        if self._refused:
            # A record of an earlier batch was refused: nothing behind it may land before it
            # does (its batch's confirm fails, and the retry starts again from it).
            batch.refused = self._refused
            return batch
        self._client_error_text = None
        for i, (value, key, headers) in enumerate(records):
            while True:
                try:
                    producer.produce(self.topic, value, key=key, headers=headers, on_delivery=batch.callback(i))
                    break
                except BufferError:  # librdkafka's local queue is full: serve reports, then try again
                    producer.poll(0.1)
                except KafkaException as exc:  # refused locally (e.g. larger than message.max.bytes)
                    batch.refused = self._refused = exc.args[0].str() if exc.args else str(exc)
                    break
            if batch.refused is not None:
                break
            batch.produced += 1
        producer.poll(0)
        return batch

    def _poll_sync(self, batch: _Batch) -> None:
        # Serves delivery reports (callbacks run here, in this thread); returns at the first
        # report, or after the timeout — short, so a submit waiting for the producer gets its turn.
        if self._producer is batch.producer:
            batch.producer.poll(0.05)

    def _check(self, batch: _Batch) -> None:
        """Raise ``DeliveryFailed`` unless every record of *batch* has a good report."""
        reports = batch.reports
        delivered = 0
        while delivered < len(reports) and reports[delivered] is True:
            delivered += 1
        if delivered == len(reports):
            return
        first = reports[delivered]
        if first is None:
            why = batch.refused or f"no delivery report within {self.delivery_timeout + 5.0:g} s"
        else:
            why = first.str()
        if self._client_error_text:
            why += f" ({self._client_error_text})"
        raise DeliveryFailed(f"Kafka topic {self.topic}: {why}", delivered=delivered)

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._refused = None
        if producer is not None:
            try:
                producer.purge()
                producer.flush(0)
            except Exception:  # a broken producer may fail to purge; it is dropped either way
                pass

    # -- the spooled sink's interface ----------------------------------------------------
    def _record(self, payload: bytes) -> tuple[bytes, bytes | None, list]:
        event = orjson.loads(payload)
        if self.key == "chain":
            key = self.chain.encode()
        elif self.key == "sid":
            key = (event.get("sid") or self.chain).encode()
        else:
            key = None
        return payload, key, [("seq", str(event["seq"]).encode())]

    async def submit(self, payloads: list[bytes], nursery: trio.Nursery) -> _Batch:
        return await trio.to_thread.run_sync(self._produce_sync, payloads, limiter=self._limiter)

    async def confirm(self, batch: _Batch) -> None:
        # Reports for every record produced arrive by message.timeout.ms; the margin covers the
        # last in-flight request.
        deadline = trio.current_time() + self.delivery_timeout + 5.0
        while (batch.landed < batch.produced and self._producer is batch.producer
               and trio.current_time() < deadline):
            await trio.to_thread.run_sync(self._poll_sync, batch, limiter=self._limiter)
        try:
            self._check(batch)
        except DeliveryFailed:
            # Purge what is still queued: records of unknown fate must not land behind the
            # spool's back; the retry re-sends from the first one not confirmed.
            await trio.to_thread.run_sync(self._drop_producer, limiter=self._limiter)
            raise

    async def disconnect(self) -> None:
        await trio.to_thread.run_sync(self._drop_producer, limiter=self._limiter)
