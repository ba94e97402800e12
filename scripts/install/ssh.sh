#!/usr/bin/env bash
# Install the SSH test peers and clients (Debian 12, root): OpenSSH's sshd (the
# target the proxy logs in to), the real ssh/sftp/scp clients, tmux (drives the
# interactive tests: send-keys, capture-pane), asciinema (reads the recordings back), vim (the
# full-screen program of the interactive tests: a fresh Debian 12 image has no vi).  The Python side (asyncssh,
# trio-asyncio) is a dependency of the package (pyproject.toml) and comes with
# scripts/setup's pip install.
# Idempotent: packages already present are skipped.  The tests never use the
# system's ssh service or /etc/ssh: scripts/peers/sshd.py runs a private sshd
# with its own config, host key and authorized key on a free loopback port.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
apt_ensure ssh.sh openssh-server openssh-client tmux asciinema vim

echo "ssh.sh: ok"
