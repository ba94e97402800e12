"""Single-use login codes (dbproxy/onetime.py): issue, look up by login name, consume once, expiry,
replacement, signatures, the file's mode."""

from __future__ import annotations

import os
import stat

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbproxy.identity.keys import TokenKeys
from dbproxy.onetime import CodeStore


@pytest.fixture
def keys():
    key = Ed25519PrivateKey.generate()
    return TokenKeys("EdDSA", private_key=key), TokenKeys("EdDSA", public_key=key.public_key())


def test_issue_lookup_consume_once_across_stores(tmp_path, keys):
    signing, verifying = keys
    path = str(tmp_path / "tokens.json.codes")
    cli = CodeStore(path, signing)
    code = cli.issue("ipmi", "alice", "alice", ("operator",), "bmc-1", 300, length=20)
    assert len(code.secret) == 20 and code.secret.isalnum()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    proxy_a, proxy_b = CodeStore(path, verifying), CodeStore(path, verifying)  # two proxy processes
    found = proxy_a.lookup("ipmi", "alice")
    assert found == code and proxy_b.lookup("ipmi", "alice") == code
    assert proxy_a.lookup("vnc", "alice") is None and proxy_a.lookup("ipmi", "bob") is None
    assert proxy_a.consume(found) is True
    assert proxy_b.consume(found) is False  # the other process lost the race: no second use
    assert proxy_b.lookup("ipmi", "alice") is None and proxy_a.lookup("ipmi", "alice") is None


def test_expiry_and_replacement(tmp_path, keys):
    signing, verifying = keys
    path = str(tmp_path / "codes")
    cli, proxy = CodeStore(path, signing), CodeStore(path, verifying)
    old = cli.issue("ipmi", "alice", "alice", (), "bmc-1", 300, now=1000)
    assert proxy.lookup("ipmi", "alice", now=1299) == old
    assert proxy.lookup("ipmi", "alice", now=1300) is None  # expired
    new = cli.issue("ipmi", "alice", "alice", (), "bmc-2", 300)
    assert proxy.lookup("ipmi", "alice") == new  # one outstanding code per (kind, name)
    assert len(orjson.loads(open(path, "rb").read())["codes"]) == 1


def test_a_forged_entry_is_ignored(tmp_path, keys):
    signing, verifying = keys
    path = str(tmp_path / "codes")
    CodeStore(path, signing).issue("ipmi", "alice", "alice", ("reader",), "bmc-1", 300)
    doc = orjson.loads(open(path, "rb").read())
    doc["codes"][0]["roles"] = ["admin"]  # someone who can write the file but holds no key
    open(path, "wb").write(orjson.dumps(doc))
    assert CodeStore(path, verifying).lookup("ipmi", "alice") is None
    other = TokenKeys("EdDSA", private_key=Ed25519PrivateKey.generate())
    CodeStore(path, other).issue("ipmi", "mallory", "mallory", ("admin",), "bmc-1", 300)
    assert CodeStore(path, verifying).lookup("ipmi", "mallory") is None
