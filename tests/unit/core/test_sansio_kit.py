"""Codecs and stages are sans-IO: importing any of them loads no trio (issue 14's kit).

Each module is imported in a fresh interpreter (this test process has trio
loaded already), and ``sys.modules`` is checked afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SANS_IO_MODULES = [
    "dbproxy.sansio",
    "dbproxy.buffer",
    "dbproxy.errors",
    "engines.postgres.codec",
    "engines.postgres.messages",
    "engines.postgres.startup",
    "engines.postgres.tap",
    "engines.postgres.stages",
    "engines.postgres.policy",
    "engines.cassandra.codec",
    "engines.cassandra.frames",
    "engines.cassandra.body",
    "engines.cassandra.requests",
    "engines.cassandra.responses",
    "engines.cassandra.protocol",
    "engines.cassandra.segments",
    "engines.cassandra.stages",
    "engines.cassandra.policy",
    "engines.mongo.codec",
    "engines.mongo.wire",
    "engines.mongo.opmsg",
    "engines.mongo.legacy",
    "engines.mongo.compression",
    "engines.mongo.commands",
    "engines.mongo.protocol",
    "engines.mongo.stages",
    "engines.mongo.stages.session",
    "engines.mongo.stages.render",
    "engines.mongo.stages.audit",
    "engines.mongo.stages.access",
    "engines.mongo.stages.auth",
    "engines.mongo.stages.handshake",
    "engines.mongo.stages.flow",
    "engines.mongo.policy",
]

_PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(",".join(sorted(m for m in sys.modules if m == "trio" or m.startswith("trio."))))
"""


def test_every_codec_and_stage_module_is_listed():
    """A new codec/stage module must join the list (else it could load trio unnoticed)."""
    names = {"codec", "messages", "startup", "tap", "stages", "policy", "frames", "segments", "wire"}
    found = {
        f"engines.{p.parent.name}.{p.stem}"
        for p in (ROOT / "engines").glob("*/*.py")
        if p.stem in names
    }
    assert found <= set(SANS_IO_MODULES), sorted(found - set(SANS_IO_MODULES))


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_importing_loads_no_trio(module: str):
    out = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_the_pipeline_uses_the_kits_objects():
    from dbproxy import pipeline, sansio

    assert pipeline.NEED_DATA is sansio.NEED_DATA
    assert pipeline.Verdict is sansio.Verdict
