"""``HeldPort`` / ``refused_port``: a port that refuses connections and that no one else can be handed.

A test that points a route at "a port nothing listens on" must not find a
listener there: ``free_port()`` closes its socket, so the next bind to port 0
(a proxy listener on ``127.0.0.1:0``) may get the very same port — which is
how a RELP sink aimed at "nowhere" once connected to the proxy's own
PostgreSQL listener in a CI run.
"""

from __future__ import annotations

import errno
import socket

import pytest

from scripts.peers import HeldPort, refused_port


def connect_errno(port: int) -> int:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port))


def test_a_held_port_refuses_connections():
    held = HeldPort()
    try:
        assert connect_errno(held.port) == errno.ECONNREFUSED
    finally:
        held.release()


def test_no_one_else_can_bind_a_held_port_until_it_is_released():
    held = HeldPort()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        with pytest.raises(OSError) as err:
            other.bind(("127.0.0.1", held.port))
        assert err.value.errno == errno.EADDRINUSE
    assert held.release() == held.port
    with socket.socket() as after:
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", held.port))
        after.listen()
        assert connect_errno(held.port) == 0


def test_binds_to_port_zero_are_never_handed_a_refused_port():
    ports = {refused_port() for _ in range(20)}
    handed = set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            handed.add(s.getsockname()[1])
    assert len(ports) == 20
    assert not ports & handed
    assert all(connect_errno(p) == errno.ECONNREFUSED for p in ports)


def test_a_port_held_for_udp_too_answers_datagrams_port_unreachable():
    held = HeldPort(udp=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as err:
                other.bind(("127.0.0.1", held.port))
            assert err.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.settimeout(5)
            sender.connect(("127.0.0.1", held.port))
            sender.send(b"\x06\x00\xff\x07")  # an RMCP ping's first bytes: nobody takes it
            with pytest.raises(ConnectionRefusedError):
                sender.recv(64)
        assert connect_errno(held.port) == errno.ECONNREFUSED
    finally:
        held.release()
