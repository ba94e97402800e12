#!/usr/bin/env bash
# What the outbound agent's isolation tests need (Debian 12, root): iproute2 for `ip netns` and veth
# pairs (scripts/peers/netns.py); the targets inside the namespace are the PostgreSQL and OpenSSH
# peers of postgres.sh and ssh.sh.  The h2 library comes with the Python package (pyproject).
# Idempotent: packages already present are skipped.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
apt_ensure agent.sh iproute2

echo "agent.sh: ok"
