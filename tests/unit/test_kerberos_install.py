"""check-config reports a gssapi route when the optional gssapi package is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.engines import default_registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path) -> str:
    keytab = tmp_path / "kt"
    keytab.write_bytes(b"\x05\x02")
    auth = {"method": "gssapi", "principal": "dbproxy@R", "keytab_file": str(keytab)}
    doc = {"listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                          "routes": [{"match": {"user": "*"}, "backend": {"address": "db:5432", "auth": auth}}]}]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_gssapi_route_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    path = _config(tmp_path)
    load_config(path, default_registry())  # gssapi installed here: valid
    monkeypatch.setitem(sys.modules, "gssapi", None)  # `import gssapi` raises ImportError
    with pytest.raises(ConfigErrors) as info:
        load_config(path, default_registry())
    (err,) = info.value.errors
    assert err.file == path
    assert err.path == "listeners[0].routes[0].backend.auth.method"
    assert "pip install 'dbproxy[kerberos]'" in err.expected and "gssapi package" in err.expected


def test_check_config_cli_names_the_extra(tmp_path):
    path = _config(tmp_path)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "gssapi.py").write_text("raise ImportError('No module named gssapi (test shadow)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), ROOT]))
    out = subprocess.run([sys.executable, "-m", "dbproxy.cli", "check-config", path], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert f"{path}: listeners[0].routes[0].backend.auth.method" in text
    assert "pip install 'dbproxy[kerberos]'" in text
