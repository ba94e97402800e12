#!/usr/bin/env bash
# Install the HTTP test client (Debian 12, root): curl, the real client of the
# HTTP listener tests (tests/unit/core/test_listen_http.py: keep-alive reuse,
# chunked bodies, HTTPS with --cacert and client certificates).
# Idempotent: skipped when curl is already installed.
set -euo pipefail

if ! command -v curl >/dev/null 2>&1; then
    echo "http.sh: installing curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends curl ca-certificates
fi

echo "http.sh: ok ($(curl --version | head -1 | cut -d' ' -f1-2))"
