"""The demo README's first command brings up: every client line it prints works (``--smoke`` runs
each once against the real servers and checks its output), and its audit trail records them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, read_audit

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("flags, protocols", [
    ((), {"postgres", "mongo"}),
    (("--all",), {"postgres", "mongo", "cassandra", "ssh", "redfish", "vnc"}),
])
def test_demo_client_lines_work(tmp_path, flags, protocols):
    import os

    env = dict(os.environ, DBPROXY_DEMO_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.demo", *flags, "--smoke"], capture_output=True, text=True,
                       env=env, cwd=str(ROOT), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "smoke: all ok" in r.stdout
    assert "export DBPROXY_TOKEN=" in r.stdout
    starts = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"].endswith("session.start")
              and e.get("success") and e.get("user") == "alice"]
    seen = {e.get("db_protocol") or e.get("protocol") for e in starts}
    assert seen >= protocols, seen
    # The token was typed into clients, never written to the trail.
    token = r.stdout.split("export DBPROXY_TOKEN=", 1)[1].split()[0]
    assert token not in (tmp_path / "audit.jsonl").read_text()
