"""The cancel-key map: the client gets the backend's real pid and the proxy's own secret."""

from __future__ import annotations

from dbproxy.engines.postgres.cancel import CancelMap
from dbproxy.engines.postgres.messages import BackendKeyData


def test_real_pid_own_secret_and_both_must_match():
    cancels = CancelMap()
    key = BackendKeyData(4242, b"BACK")
    pid, secret = cancels.issue("route-a", key)
    assert pid == 4242 and secret != b"BACK"  # the backend's secret never leaves the proxy
    assert cancels.lookup(pid, secret) == ("route-a", key)
    assert cancels.lookup(pid, b"BACK") is None and cancels.lookup(pid, bytes(4)) is None
    cancels.release(pid, secret)
    assert cancels.lookup(pid, secret) is None


def test_same_pid_on_two_backends():
    cancels = CancelMap()
    a, b = BackendKeyData(77, b"AAAA"), BackendKeyData(77, b"BBBB")
    ka, kb = cancels.issue("host-a", a), cancels.issue("host-b", b)
    assert ka[0] == kb[0] == 77 and ka != kb
    assert cancels.lookup(*ka) == ("host-a", a) and cancels.lookup(*kb) == ("host-b", b)
    cancels.release(*ka)
    assert cancels.lookup(*kb) == ("host-b", b)


def test_backend_without_key_data_gets_a_pid_and_nothing_to_cancel():
    cancels = CancelMap()
    pid, secret = cancels.issue("route", None)
    assert pid > 0 and cancels.lookup(pid, secret) is None
