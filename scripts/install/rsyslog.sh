#!/usr/bin/env bash
# Install the rsyslog test peer (Debian 12, root): rsyslog with its GnuTLS
# network driver and its RELP input (imrelp, package rsyslog-relp), the SIEM
# of the syslog and relp audit-sink tests.
# Idempotent: packages already present are skipped.  The tests never use the
# system's rsyslog service or /etc/rsyslog.conf: scripts/peers/rsyslog.py runs
# a private rsyslogd with its own config on free loopback ports.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
# Installing rsyslog removes syslog-ng if present (they conflict): fine on a test machine.
apt_ensure rsyslog.sh rsyslog rsyslog-gnutls rsyslog-relp

echo "rsyslog.sh: ok"
