"""Config of listener kinds: ``kind`` checked against the engine's ``listener_kinds``, and each kind's section."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import HttpOptions, UdpOptions, load_config
from dbproxy.errors import ConfigErrors

from .listen_support import listener, registry
from .test_config import errors_for, good


def _load(tmp_path, listeners: list[dict]):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"listeners": listeners}))
    return load_config(str(path), registry())


def _errors(tmp_path, listeners: list[dict]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, listeners)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def _tls(tmp_path) -> dict:
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    return {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}


def test_existing_configs_are_tcp(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(good(tmp_path)))
    from .test_config import REG

    (lc,) = load_config(str(path), REG).listeners
    assert lc.kind == "tcp"


def test_database_engines_serve_tcp_only(tmp_path):
    doc = good(tmp_path)
    doc["listeners"][0]["kind"] = "udp"
    assert errors_for(tmp_path, doc) == ["listeners[0].kind: a kind the postgres engine serves (tcp), got 'udp'"]


def test_unknown_kind(tmp_path):
    doc = good(tmp_path)
    doc["listeners"][0]["kind"] = "quic"
    assert errors_for(tmp_path, doc) == ["listeners[0].kind: one of tcp, tls, udp, http, got 'quic'"]


def test_kinds_and_their_sections_load(tmp_path):
    tls = _tls(tmp_path)
    u, h, t = _load(tmp_path, [
        listener("u", "udpecho", kind="udp", udp={"max_sessions": 5, "idle_timeout_seconds": 2, "queue_datagrams": 3}),
        listener("h", "web", kind="http", tls=tls, http={"max_body_bytes": 0, "request_timeout_seconds": 4,
                                                          "keepalive_timeout_seconds": 5, "max_header_bytes": 2048}),
        listener("t", "line", kind="tls", tls=tls),
    ]).listeners
    assert (u.kind, u.udp) == ("udp", UdpOptions(max_sessions=5, idle_timeout=2.0, queue_datagrams=3))
    assert (h.kind, h.http) == ("http", HttpOptions(max_body_bytes=0, max_header_bytes=2048, request_timeout=4.0,
                                                    keepalive_timeout=5.0))
    assert h.tls is not None and t.kind == "tls"


def test_kind_mistakes_are_named(tmp_path):
    tls = _tls(tmp_path)
    errors = _errors(tmp_path, [
        listener("a", "line", kind="tls"),  # no tls section
        listener("b", "udpecho", kind="udp", tls=tls),  # no DTLS
        listener("c", "web", kind="http", udp={}),  # another kind's section
        listener("d", "udpecho", kind="udp", udp={"queue_datagrams": 0, "nope": 1, "max_datagram_size": 70000}),
        listener("e", "web", kind="http", http={"request_timeout_seconds": "soon"}),
        listener("f", "web"),  # tcp by default, which this engine does not serve
    ])
    assert errors == [
        "listeners[0]: a \"tls\" section (cert_file, key_file) for kind \"tls\"",
        "listeners[1].tls: no \"tls\" on a listener of kind \"udp\" (DTLS is not supported)",
        "listeners[2].udp: only on a listener of kind \"udp\", this one is 'http'",
        "listeners[3].udp.nope: no key 'nope' here (allowed: idle_timeout_seconds, max_datagram_size, max_sessions, queue_datagrams)",
        "listeners[3].udp.queue_datagrams: an integer >= 1, got 0",
        "listeners[3].udp.max_datagram_size: at most 65535 (the largest UDP payload), got 70000",
        "listeners[4].http.request_timeout_seconds: a number >= 0.01, got 'soon'",
        "listeners[5].kind: a kind the web engine serves (http), got 'tcp'",
    ]
