"""Redfish through dbproxy vs direct: latency of one GET of a ComputerSystem, sequential, one client connection.

Strategy: a private sushy-emulator (``scripts.peers.sushy``) and one dbproxy with a Redfish listener (token
auth, the proxy's Redfish session to the emulator, JSONL audit via the audit worker) in front of it, both on
loopback; rounds alternate direct (the emulator with an X-Auth-Token) and through the proxy (Bearer token).
werkzeug under the emulator closes every connection, so both paths open a TCP connection to the emulator
per request; the proxy adds its own hop, the token check, the policy and two audit events.  Indicative only
on a shared machine: it reports medians and p90 of each round.

    python -m scripts.bench.redfish_bench WORKDIR [N]
"""
import http.client
import statistics
import sys
import time
from pathlib import Path

from scripts.peers.sushy import start_sushy, SYSTEM_UUID
from tests.support import ProxyProcess, dbproxy_cli

work = Path(sys.argv[1])
work.mkdir(exist_ok=True)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
bmc = start_sushy(work / "sushy")
dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(work / "token.key"), "--public-key-file", str(work / "token.pub"), check=True)
cfg = {"identity": {"token": {"algorithm": "EdDSA", "key_file": str(work / "token.key"), "public_key_file": str(work / "token.pub")}},
       "roles": {"r": {"routes": ["*"], "bmcs": ["*"], "redfish": [{"methods": ["GET"], "paths": ["/redfish/v1/*"]}]}},
       "listeners": [{"name": "rf", "protocol": "redfish", "kind": "http", "listen": "127.0.0.1:0", "target": "bmc-1",
                      "auth": {"methods": ["token"]},
                      "routes": [{"backend": {"address": bmc.address, "auth": {"method": "session", "username": bmc.username, "password_file": str(bmc.password_file)}}}]}],
       "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]}}
proxy = ProxyProcess(work / "proxy", cfg).start()
token = dbproxy_cli("token", "issue", "--config", str(proxy.config_path), "--user", "u", "--roles", "r", "--ttl", "1h", check=True).stdout.strip()
st, h, _ = bmc.request("POST", "/redfish/v1/SessionService/Sessions", {"UserName": bmc.username, "Password": bmc.password}, headers={"Authorization": ""})
path = f"/redfish/v1/Systems/{SYSTEM_UUID}"

def run(port, headers, label):
    times = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(N):
        t = time.perf_counter()
        conn.request("GET", path, headers=headers)
        r = conn.getresponse(); r.read()
        if r.will_close:
            conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert r.status == 200
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(f"{label}: median {statistics.median(times):.2f} ms, p90 {times[int(len(times)*0.9)]:.2f} ms over {N}")
try:
    run(bmc.port, {"X-Auth-Token": h["X-Auth-Token"]}, "direct to the emulator")
    run(proxy.port("rf"), {"Authorization": f"Bearer {token}"}, "through the proxy   ")
    run(bmc.port, {"X-Auth-Token": h["X-Auth-Token"]}, "direct to the emulator")
    run(proxy.port("rf"), {"Authorization": f"Bearer {token}"}, "through the proxy   ")
finally:
    proxy.stop(); bmc.stop()
