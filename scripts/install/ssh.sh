#!/usr/bin/env bash
# Install the SSH test peers and clients (Debian 12, root): OpenSSH's sshd (the
# target the proxy logs in to), the real ssh/sftp/scp clients, tmux (drives the
# interactive tests: send-keys, capture-pane), asciinema (reads the recordings back).  The Python side (asyncssh,
# trio-asyncio) is a dependency of the package (pyproject.toml) and comes with
# scripts/setup's pip install.
# Idempotent: packages already present are skipped.  The tests never use the
# system's ssh service or /etc/ssh: scripts/peers/sshd.py runs a private sshd
# with its own config, host key and authorized key on a free loopback port.
set -euo pipefail

PKGS=(openssh-server openssh-client tmux asciinema)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "ssh.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: on a machine with an init system, do not start Debian's sshd on port 22.
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "ssh.sh: ok"
