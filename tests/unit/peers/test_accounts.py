"""scripts.peers.accounts: a test account's password stays the same across starts on one machine,
so parallel test runs sharing the system account do not reset each other's logins."""

from __future__ import annotations

import os
import spwd  # noqa: deprecated in 3.11 like crypt
import stat

import pytest

from scripts.peers import accounts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _matches(name: str, password: str) -> bool:
    import crypt  # deprecated in 3.11 (hence the filter), still the stdlib's check of a shadow hash

    hashed = spwd.getspnam(name).sp_pwdp
    return crypt.crypt(password, hashed) == hashed


def test_the_password_is_stable_and_set(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("creates a local account: the tests run as root here")
    monkeypatch.setattr(accounts, "STATE_DIR", tmp_path / "accounts")
    first = accounts.ensure_account("dbptestacct", shell="/usr/sbin/nologin", prefix="Xp-")
    second = accounts.ensure_account("dbptestacct", shell="/usr/sbin/nologin", prefix="Xp-")
    assert first == second and first.startswith("Xp-")
    assert _matches("dbptestacct", first)
    kept = tmp_path / "accounts" / "dbptestacct"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and kept.read_text().strip() == first
