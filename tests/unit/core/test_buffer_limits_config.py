"""Config of the memory bounds: the ``buffers`` section, and ``max_message_size`` capped at each protocol's limit."""

from __future__ import annotations

import json

import pytest

from dbproxy.buffer import DEFAULT_BUFFER_BUDGET, DEFAULT_MESSAGE_TIMEOUT
from dbproxy.config import load_config
from dbproxy.server import ProxyServer

from .test_config import REG, errors_for, good


def _listener(protocol: str, max_size: int) -> dict:
    backend = {"address": "127.0.0.1:1", "auth": {"method": "none"}}
    if protocol == "postgres":
        backend = {"address": "127.0.0.1:1", "auth": {"method": "trust"}}
    return {"name": protocol, "protocol": protocol, "listen": "127.0.0.1:0", "max_message_size": max_size,
            "routes": [{"backend": backend}]}


def _doc(tmp_path, protocol: str, max_size: int) -> dict:
    return {**good(tmp_path), "listeners": [_listener(protocol, max_size)]}


# (protocol, its own limit, where the limit comes from as the error names it)
LIMITS = [
    ("postgres", 0x3FFFFFFF, "MaxAllocSize"),
    ("cassandra", 256 * 1024 * 1024, "256 MiB"),
    ("mongo", 48_000_000, "maxMessageSizeBytes"),
]


@pytest.mark.parametrize(("protocol", "limit", "source"), LIMITS)
def test_max_message_size_above_protocol_limit_is_refused(tmp_path, protocol, limit, source):
    errors = errors_for(tmp_path, _doc(tmp_path, protocol, limit + 1))
    assert len(errors) == 1, errors
    (err,) = errors
    assert err.startswith(f"listeners[0].max_message_size: at most {limit} bytes, the {protocol} protocol's limit")
    assert source in err and f"got {limit + 1}" in err


@pytest.mark.parametrize(("protocol", "limit", "source"), LIMITS)
def test_max_message_size_at_protocol_limit_loads(tmp_path, protocol, limit, source):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_doc(tmp_path, protocol, limit)))
    (lc,) = load_config(str(path), REG).listeners
    assert lc.max_message_size == limit


def test_issue_value_2147483647_is_refused(tmp_path):
    # The value the issue found accepted.
    (err,) = errors_for(tmp_path, _doc(tmp_path, "postgres", 2147483647))
    assert "listeners[0].max_message_size: at most 1073741823 bytes" in err


def test_buffers_defaults(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(good(tmp_path)))
    cfg = load_config(str(path), REG)
    assert cfg.buffers.budget_bytes == DEFAULT_BUFFER_BUDGET == 256 * 1024 * 1024
    assert cfg.buffers.message_timeout == DEFAULT_MESSAGE_TIMEOUT


def test_buffers_configured_and_shared_by_engines(tmp_path):
    doc = {**good(tmp_path), "buffers": {"budget_bytes": 32 * 1024 * 1024, "message_timeout_seconds": 2.5}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(str(path), REG)
    assert (cfg.buffers.budget_bytes, cfg.buffers.message_timeout) == (32 * 1024 * 1024, 2.5)
    server = ProxyServer(cfg, REG)
    server._make_engines()
    budget = server.services.buffers
    assert (budget.limit, budget.message_timeout) == (32 * 1024 * 1024, 2.5)
    assert all(engine.services.buffers is budget for engine in server.engines.values())


@pytest.mark.parametrize(
    ("buffers", "expected"),
    [
        ({"budget_bytes": 1000}, "buffers.budget_bytes: an integer >= 1048576, got 1000"),
        ({"budget_bytes": "32M"}, "buffers.budget_bytes: an integer >= 1048576, got '32M'"),
        ({"message_timeout_seconds": 0}, "buffers.message_timeout_seconds: a number >= 1.0, got 0"),
        ({"budget": 1 << 20}, "buffers.budget: no key 'budget' here (allowed: budget_bytes, message_timeout_seconds)"),
        ([], "buffers: an object, got an array"),
    ],
)
def test_buffers_errors_name_path_and_expectation(tmp_path, buffers, expected):
    assert errors_for(tmp_path, {**good(tmp_path), "buffers": buffers}) == [expected]
