#!/usr/bin/env bash
# Install the Redfish test peer and client (Debian 12, root): sushy-tools' emulator (the BMC of
# tests/integration/test_redfish_proxy.py, run by scripts/peers/sushy.py with its fake driver and
# Basic auth over an htpasswd of bcrypt hashes, written with bcrypt, a dependency of sushy-tools)
# and the OpenStack `sushy` client; curl comes from http.sh.  Both are also in the package's test
# extras (pyproject.toml); this step makes sure they are there when only the step is run.
# Idempotent: pip skips what is installed.
set -euo pipefail

PY=${PYTHON:-python3}
if ! "$PY" -c "import sushy_tools, sushy, bcrypt" >/dev/null 2>&1; then
    echo "redfish.sh: installing sushy-tools and sushy"
    "$PY" -m pip install -q --root-user-action=ignore "sushy-tools>=2.2,<3" "sushy>=5"
fi

echo "redfish.sh: ok (sushy-tools $("$PY" -c 'import importlib.metadata as m; print(m.version("sushy-tools"))'))"
