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
    "dbproxy.proxyproto",
    "dbproxy.buffer",
    "dbproxy.errors",
    "dbproxy.tee",
    "dbproxy.audit.frametap",
    "dbproxy.engines.postgres.codec",
    "dbproxy.engines.postgres.messages",
    "dbproxy.engines.postgres.startup",
    "dbproxy.engines.postgres.tap",
    "dbproxy.engines.postgres.stages",
    "dbproxy.engines.postgres.policy",
    "dbproxy.engines.cassandra.codec",
    "dbproxy.engines.cassandra.frames",
    "dbproxy.engines.cassandra.body",
    "dbproxy.engines.cassandra.requests",
    "dbproxy.engines.cassandra.responses",
    "dbproxy.engines.cassandra.protocol",
    "dbproxy.engines.cassandra.segments",
    "dbproxy.engines.cassandra.stages",
    "dbproxy.engines.cassandra.observers",
    "dbproxy.engines.cassandra.prepared",
    "dbproxy.engines.cassandra.values",
    "dbproxy.engines.cassandra.tap",
    "dbproxy.engines.cassandra.checks",
    "dbproxy.engines.cassandra.policy",
    "dbproxy.engines.ssh.config",
    "dbproxy.engines.ssh.policy",
    "dbproxy.engines.ssh.sftp",
    "dbproxy.engines.ssh.recording",
    "dbproxy.engines.redfish.codec",
    "dbproxy.engines.redfish.policy",
    "dbproxy.engines.redfish.config",
    "dbproxy.engines.vnc.updates",
    "dbproxy.engines.vnc.recording",
    "dbproxy.engines.vnc.render",
    "dbproxy.engines.vnc.replay",
    "dbproxy.terminal.recording",
    "dbproxy.terminal.observer",
    "dbproxy.terminal.linepolicy",
    "dbproxy.terminal.replay",
    "dbproxy.terminal.audit",
    "dbproxy.terminal.config",
    "dbproxy.engines.telnet.codec",
    "dbproxy.engines.telnet.config",
    "dbproxy.engines.telnet.login",
    "dbproxy.engines.vnc.rfb",
    "dbproxy.engines.vnc.stages",
    "dbproxy.engines.vnc.config",
    "dbproxy.engines.vnc.server",
    "dbproxy.engines.mongo.codec",
    "dbproxy.engines.mongo.wire",
    "dbproxy.engines.mongo.opmsg",
    "dbproxy.engines.mongo.legacy",
    "dbproxy.engines.mongo.compression",
    "dbproxy.engines.mongo.commands",
    "dbproxy.engines.mongo.protocol",
    "dbproxy.engines.mongo.stages",
    "dbproxy.engines.mongo.stages.session",
    "dbproxy.engines.mongo.stages.render",
    "dbproxy.engines.mongo.stages.audit",
    "dbproxy.engines.mongo.stages.access",
    "dbproxy.engines.mongo.stages.auth",
    "dbproxy.engines.mongo.stages.handshake",
    "dbproxy.engines.mongo.stages.flow",
    "dbproxy.engines.mongo.policy",
    "dbproxy.engines.mongo.tap",
    "dbproxy.engines.mongo.tee",
    "dbproxy.engines.mongo.errors",
    "dbproxy.engines.rdp.x224",
    "dbproxy.engines.rdp.relay",
    "dbproxy.engines.rdp.config",
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
        f"dbproxy.engines.{p.parent.name}.{p.stem}"
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
