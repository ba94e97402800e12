"""The demo: a private PostgreSQL, dbproxy in front of it, and the psql line to use.

The proxy holds the database credential (SCRAM-SHA-256) and writes its audit
trail to ``demo/audit.jsonl``; the person at psql never sees a password.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.peers.postgres import start_postgres

ROOT = Path(__file__).resolve().parent.parent


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(os.environ.get("DBPROXY_DEMO_DIR") or tempfile.mkdtemp(prefix="dbproxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pg = start_postgres(workdir / "pg")
    user, password = pg.users["scram-sha-256"]
    secret = workdir / "app.secret"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    audit_path = workdir / "audit.jsonl"
    port = int(os.environ.get("DBPROXY_DEMO_PORT", "0"))
    config = {
        "listeners": [
            {
                "name": "pg-demo",
                "protocol": "postgres",
                "listen": f"127.0.0.1:{port}",
                "routes": [
                    {
                        "name": "app",
                        "match": {"database": "app*"},
                        "backend": {
                            "address": f"127.0.0.1:{pg.port}",
                            "database": "app",
                            "user": user,
                            "auth": {"method": "scram-sha-256", "password_file": str(secret)},
                        },
                    }
                ],
            }
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": str(audit_path)}]},
    }
    config_path = workdir / "dbproxy.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proxy = subprocess.Popen(
        [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    proxy_port = None
    assert proxy.stdout is not None
    for line in proxy.stdout:
        sys.stdout.write(line)
        if "listening on" in line:
            proxy_port = int(line.rsplit(":", 1)[1])
            break
    if proxy_port is None:
        pg.stop()
        return 1
    print()
    print("dbproxy is in front of a private PostgreSQL; it holds the credential for", user)
    print(f"  config:  {config_path}")
    print(f"  audit:   {audit_path}   (python -m dbproxy.cli audit tail {audit_path} --follow)")
    print("Connect with:")
    print(f"  psql \"host=127.0.0.1 port={proxy_port} dbname=app user=alice sslmode=disable\"")
    print("Ctrl-C stops the demo.", flush=True)
    try:
        while proxy.poll() is None:
            line = proxy.stdout.readline()
            if line:
                sys.stdout.write(line)
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
