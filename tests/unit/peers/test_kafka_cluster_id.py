"""The private Kafka node's cluster id (scripts/peers/kafka_server.py)."""

from __future__ import annotations

import base64

from scripts.peers.kafka_server import random_cluster_id


def test_cluster_ids_are_kafka_uuids_that_never_start_with_a_dash():
    # ``kafka-storage format -t ID`` takes an id that starts with "-" for an option and fails:
    # one id in 64 would (its first base64 character), so 3000 draws meet that case.
    ids = [random_cluster_id() for _ in range(3000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 and len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
