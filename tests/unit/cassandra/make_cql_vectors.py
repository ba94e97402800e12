"""Regenerate tests/data/cassandra/*.bin from the official cassandra-driver's serializers.

Run from the repository root:  python tests/unit/cassandra/make_cql_vectors.py
The vectors are fixed bytes: the tests decode them and check every field.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from cassandra import ConsistencyLevel  # noqa: E402
from cassandra.protocol import (  # noqa: E402
    _UNSET_VALUE,
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    QueryMessage,
    StartupMessage,
)
from cassandra.query import BatchType  # noqa: E402

from tests.unit.cassandra.cql_testutil import DATA_DIR, driver_frame, driver_segments  # noqa: E402

SELECT = "SELECT release_version FROM system.local WHERE key = 'local'"


def vectors() -> dict[str, bytes]:
    v = {}
    v["v4_startup_lz4.bin"] = driver_frame(StartupMessage("3.0.0", {"COMPRESSION": "lz4", "DRIVER_NAME": "x"}), 4, stream=1)
    v["v4_query_lz4.bin"] = driver_frame(
        QueryMessage(SELECT, ConsistencyLevel.LOCAL_QUORUM, fetch_size=5000, timestamp=1700000000000001), 4, stream=7, compression="lz4"
    )
    v["v4_query_snappy.bin"] = driver_frame(
        QueryMessage(SELECT, ConsistencyLevel.ONE, paging_state=b"\x00\x01page"), 4, stream=8, compression="snappy"
    )
    v["v3_batch.bin"] = driver_frame(
        BatchMessage(
            BatchType.UNLOGGED,
            [(False, "INSERT INTO ks.t (k, v) VALUES (?, ?)", [b"\x00\x00\x00\x01", None]), (True, b"\xca\xfe", [b"v"])],
            ConsistencyLevel.QUORUM,
            serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
            timestamp=42,
        ),
        3,
        stream=9,
    )
    v["v5_execute.bin"] = driver_frame(
        ExecuteMessage(
            b"\x01\x02\x03\x04",
            [b"abc", None, _UNSET_VALUE],
            ConsistencyLevel.ALL,
            fetch_size=100,
            skip_meta=True,
            result_metadata_id=b"\xee\xff",
        ),
        5,
        stream=300,
    )
    frames = (
        driver_frame(QueryMessage(SELECT, ConsistencyLevel.ONE, keyspace="system"), 5, stream=1)
        + driver_frame(PrepareMessage("SELECT * FROM t WHERE k = ?", keyspace="ks"), 5, stream=2)
    )
    v["v5_segments_plain.bin"] = driver_segments(frames, compress=False)
    v["v5_segments_lz4.bin"] = driver_segments(frames, compress=True)
    big = "SELECT * FROM ks.t WHERE k IN (" + ", ".join(str(i) for i in range(21500)) + ")"
    v["v5_segments_split.bin"] = driver_segments(driver_frame(QueryMessage(big, ConsistencyLevel.ONE), 5, stream=5), compress=False)
    v["v2_options.bin"] = driver_frame(OptionsMessage(), 2, stream=3)
    v["dse_v2_options.bin"] = driver_frame(OptionsMessage(), 0x42, stream=0)
    return v


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in vectors().items():
        (DATA_DIR / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
