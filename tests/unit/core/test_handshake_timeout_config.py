"""``handshake_timeout_seconds`` per listener: validated, and what engines wait for."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.engine import DEFAULT_HANDSHAKE_TIMEOUT, Services
from dbproxy.errors import ConfigErrors
from dbproxy.engines import default_registry

REG = default_registry()


def _load(tmp_path, **listener):
    doc = {"listeners": [dict({"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                               "routes": [{"backend": {"address": "db:5432", "auth": {"method": "trust"}}}]}, **listener)]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    return load_config(str(path), REG), str(path)


def test_default_and_configured(tmp_path):
    cfg, _ = _load(tmp_path)
    engine = REG.get("postgres")(cfg.listeners[0], Services(recorder=None))
    assert engine.handshake_timeout == DEFAULT_HANDSHAKE_TIMEOUT
    cfg, _ = _load(tmp_path, handshake_timeout_seconds=2.5)
    engine = REG.get("postgres")(cfg.listeners[0], Services(recorder=None))
    assert engine.handshake_timeout == 2.5


@pytest.mark.parametrize("value", [0, -1, "10", True, 7200])
def test_bad_values_named(tmp_path, value):
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, handshake_timeout_seconds=value)
    (err,) = info.value.errors
    assert err.path == "listeners[0].handshake_timeout_seconds" and err.file.endswith("cfg.json")
