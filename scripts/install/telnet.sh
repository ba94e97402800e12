#!/usr/bin/env bash
# Install the Telnet test peer and client (Debian 12, root): inetutils-telnetd (the target the
# proxy logs in to, at its real login prompt: telnetd runs /bin/login), the `telnet` client the
# interactive tests drive in tmux, and tmux itself.  inetutils-telnetd is inetd-style (one
# process per connection on its stdin): scripts/peers/telnetd.py accepts on a loopback port
# and starts one per connection, so no inetd and no system service are involved.
# Idempotent: packages already present are skipped.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
apt_ensure telnet.sh inetutils-telnetd telnet tmux

echo "telnet.sh: ok"
