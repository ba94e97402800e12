"""Single-use login codes (dbproxy/onetime.py): issue, look up by login name or list a kind, consume once
(marked used, kept until expiry), expiry, replacement, signatures, the file's mode and location."""

from __future__ import annotations

import os
import stat

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbproxy.identity.keys import TokenKeys
from dbproxy.identity.config import TokenConfig
from dbproxy.onetime import CodeStore, codes_path, kind_spec


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
    # the entry stays, marked used (a third process sees it used, not unknown), until it expires
    (seen,) = CodeStore(path, verifying).entries("ipmi")
    assert seen.id == code.id and seen.used
    assert CodeStore(path, verifying).lookup("ipmi", "alice") is None


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


def test_a_kind_without_login_names_lists_used_and_expired_codes(tmp_path, keys):
    """The VNC-style use: the protocol names no user, the engine tries the client's answer against every
    code of the kind and tells a used or expired code apart from a wrong one."""
    signing, verifying = keys
    path = str(tmp_path / "codes.json")
    cli, proxy, other_proxy = CodeStore(path, signing), CodeStore(path, verifying), CodeStore(path, verifying)
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    first = cli.issue("desk", "", "alice", ("ops",), "desk-1", 60, length=8, alphabet=alphabet, now=1000)
    second = cli.issue("desk", "", "bob", (), "desk-2", 60, length=8, alphabet=alphabet, now=1001)
    cli.issue("other", "alice", "alice", (), "x", 60, now=1001)
    assert len(first.secret) == 8 and set(first.secret.decode()) <= set(alphabet)
    assert first.secret.decode() not in repr(first)
    # nameless codes do not replace each other
    assert [(c.id, c.used) for c in proxy.entries("desk")] == [(first.id, 0), (second.id, 0)]
    assert proxy.consume(first, now=1002) is True
    assert other_proxy.consume(first, now=1003) is False  # a second use, from another process
    assert [(c.id, bool(c.used)) for c in other_proxy.entries("desk")] == [(first.id, True), (second.id, False)]
    # expired entries are still listed (the engine says "expired")... until the next write prunes them
    assert [c.id for c in proxy.entries("desk")] == [first.id, second.id]
    third = cli.issue("desk", "", "carl", (), "desk-3", 60, length=8, alphabet=alphabet)
    assert [c.id for c in proxy.entries("desk")] == [third.id]
    # another key's entries are not believed
    assert CodeStore(path, TokenKeys("HS256", secret=b"t" * 32)).entries("desk") == []


def test_consume_prunes_expired_entries_and_a_used_code_is_not_looked_up(tmp_path, keys):
    signing, verifying = keys
    path = str(tmp_path / "codes")
    cli, proxy = CodeStore(path, signing), CodeStore(path, verifying)
    cli.issue("ipmi", "old", "old", (), "bmc-1", 10, now=1000)
    code = cli.issue("ipmi", "alice", "alice", (), "bmc-1", 300)
    assert proxy.consume(code) is True
    assert [e["name"] for e in orjson.loads(open(path, "rb").read())["codes"]] == ["alice"]
    assert CodeStore(path, verifying).lookup("ipmi", "alice") is None  # used: skipped by the lookup


def test_codes_path_and_kind_defaults():
    def cfg(**kw):
        return TokenConfig("HS256", "k", None, kw.get("registry"), None, codes_file=kw.get("codes"))

    assert codes_path(cfg(codes="/s/codes.json", registry="/s/reg.json")) == "/s/codes.json"
    assert codes_path(cfg(registry="/s/reg.json")) == "/s/reg.json.codes"
    assert codes_path(cfg()) is None and codes_path(None) is None
    spec = kind_spec({"length": 8, "ttl": 60})
    assert spec["max_ttl"] == 60 and spec["max_name"] == 255 and spec["alphabet"].isalnum()
