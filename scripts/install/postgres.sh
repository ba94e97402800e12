#!/usr/bin/env bash
# Install the PostgreSQL, MIT Kerberos and pgbouncer test peers (Debian 12, root).
# Idempotent: packages already present are skipped, so a second run takes ~1 s.
# The tests never use Debian's default cluster/services: scripts/peers/*.py start
# private instances on free loopback ports.
set -euo pipefail

PKGS=(postgresql-15 postgresql-contrib krb5-kdc krb5-admin-server krb5-user
      libkrb5-dev pgbouncer)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "postgres.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # krb5-config asks for a default realm; the peers never read /etc/krb5.conf.
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
# gssapi builds from source against libkrb5-dev (krb5-config), ~50 s.
if ! "$PY" -c 'import gssapi' 2>/dev/null; then
    echo "postgres.sh: pip install gssapi"
    "$PY" -m pip install -q --root-user-action=ignore gssapi
fi

echo "postgres.sh: ok"
