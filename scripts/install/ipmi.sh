#!/usr/bin/env bash
# Install the IPMI test peer and client (Debian 12, root): OpenIPMI's BMC simulator `ipmi_sim`
# (package openipmi; run by scripts/peers/ipmi_sim.py with its own lan.conf and .emu) and
# `ipmitool` (the `-I lanplus` client of tests/integration/test_ipmi_proxy.py).  Idempotent.
set -euo pipefail
. "$(dirname "$0")/apt.sh"

apt_ensure ipmi.sh openipmi ipmitool
command -v ipmi_sim >/dev/null && command -v ipmitool >/dev/null
echo "ipmi.sh: ok ($(ipmitool -V))"
