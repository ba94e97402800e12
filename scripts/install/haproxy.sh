#!/usr/bin/env bash
# Install HAProxy (Debian 12, root) and systemd's systemd-analyze (tests/unit/core/test_systemd_unit.py checks
# configs/systemd/dbproxy.service with it). HAProxy is the real load balancer in front of dbproxy in the PROXY
# protocol tests (tests/integration/test_proxy_protocol.py, scripts/peers/haproxy.py).  Debian's
# package starts no daemon here (no systemd); the tests run their own in the foreground.
# Idempotent: a second run costs ~1 s.
set -euo pipefail
. "$(dirname "$0")/apt.sh"
apt_ensure haproxy.sh haproxy systemd
echo "haproxy.sh: ok ($(/usr/sbin/haproxy -v | head -1 | cut -d' ' -f1-3))"
