#!/usr/bin/env bash
# Install the VNC test peers and viewers (Debian 12, root): TigerVNC's X server (Xtigervnc) and
# x11vnc on Xvfb as the desktops the proxy logs in to, xterm drawing known content on them,
# tigervnc-tools (vncpasswd: the password files), TigerVNC's viewer (VeNCrypt through the proxy,
# run under Xvfb) and ImageMagick's `import` (screenshots of that viewer).  vncdotool, the scripted
# viewer, is a Python test dependency (pyproject's "test" extra).
# Idempotent: packages already present are skipped.
set -euo pipefail

. "$(dirname "$0")/apt.sh"
apt_ensure vnc.sh tigervnc-standalone-server tigervnc-tools x11vnc xvfb xterm imagemagick tigervnc-viewer \
    xfonts-base

echo "vnc.sh: ok"
