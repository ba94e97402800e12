#!/usr/bin/env bash
# Install the RDP test peer and client (Debian 12, root): xrdp (the RDP server the proxy passes
# connections through to; scripts/peers/xrdp.py runs it on a loopback port with a private config
# directory, never as a system service) and xfreerdp (freerdp2-x11), whose `/auth-only` runs the
# connection sequence through TLS and CredSSP/NLA and exits 0 when the credentials are accepted.
# xfreerdp is an X client even with /auth-only: it needs a DISPLAY, so Xvfb comes too.
# Idempotent: packages already present are skipped.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
apt_ensure rdp.sh xrdp freerdp2-x11 xvfb openssl

# The Debian package enables and (where systemd runs) starts xrdp on port 3389: the tests run
# their own instance; a system one would only hold a port and a PAM stack nobody asked for.
# Without systemd (a container), the package's init script may have started them: stopped too, since
# the tests' sesman needs the port the installed sesman.ini names (xrdp looks for sesman there).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now xrdp xrdp-sesman >/dev/null 2>&1 || true
elif [ -x /etc/init.d/xrdp ]; then
    /etc/init.d/xrdp stop >/dev/null 2>&1 || true
fi

echo "rdp.sh: ok"
