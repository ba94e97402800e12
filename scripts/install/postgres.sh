#!/usr/bin/env bash
# Install the PostgreSQL, MIT Kerberos and pgbouncer test peers (Debian 12, root).
# Idempotent: packages already present are skipped, so a second run takes ~1 s.
# The tests never use Debian's default cluster/services: scripts/peers/*.py start
# private instances on free loopback ports.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
# krb5-config asks for a default realm (debconf, non-interactive: the default); the peers never read /etc/krb5.conf.
apt_ensure postgres.sh postgresql-15 postgresql-contrib krb5-kdc krb5-admin-server krb5-user \
    libkrb5-dev pgbouncer

PY=${PYTHON:-python3}
# gssapi builds from source against libkrb5-dev (krb5-config), ~50 s.
if ! "$PY" -c 'import gssapi' 2>/dev/null; then
    echo "postgres.sh: pip install gssapi"
    "$PY" -m pip install -q --root-user-action=ignore gssapi
fi

echo "postgres.sh: ok"
