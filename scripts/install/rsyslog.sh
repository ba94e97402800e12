#!/usr/bin/env bash
# Install the rsyslog test peer (Debian 12, root): rsyslog with its GnuTLS
# network driver, the SIEM of the syslog audit-sink tests.
# Idempotent: packages already present are skipped.  The tests never use the
# system's rsyslog service or /etc/rsyslog.conf: scripts/peers/rsyslog.py runs
# a private rsyslogd with its own config on free loopback ports.
set -euo pipefail

PKGS=(rsyslog rsyslog-gnutls)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "rsyslog.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Installing rsyslog removes syslog-ng if present (they conflict): fine on a test machine.
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "rsyslog.sh: ok"
