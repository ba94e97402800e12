"""The SSH proxy at scale: 50 MB transfers, 50 sessions at once, 100 MB of exec output.

Real OpenSSH ``sshd`` as the target and the real ``ssh``/``sftp``/``scp``
clients, through the ``sshproxy`` fixture of ``test_ssh_proxy.py`` (its
helpers are reused).  The target is this machine, so a file put to the
target lands in the test's ``tmp_path``.  Payloads live in files and are
hashed in chunks (the machine is small and shared); every check is exact:
byte-identical files, the audit's SHA-256 equal to hashlib's, byte counters
equal to what the client counted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.conftest import require_binary
from tests.integration.test_ssh_proxy import client_env, events, ssh_options, sshproxy  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

SIZE = 50 * 1024 * 1024 + 7  # not a multiple of any block or packet size
CHUNK = 1024 * 1024


def random_file(path, size: int = SIZE) -> str:
    """Write ``size`` random bytes to ``path`` in chunks; return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sessions_to(es: list[dict], target: str) -> set:
    return {e["sid"] for e in es if e["event"] == "ssh.session.start" and e.get("requested_target") == target
            and e["success"]}


def ended(es: list[dict], sids: set) -> list[dict]:
    return [e for e in es if e["event"] == "ssh.session.end" and e.get("sid") in sids]


def test_sftp_50mb_put_and_get(sshproxy, tmp_path):  # noqa: F811
    require_binary("sftp")
    src, remote, back = tmp_path / "up.bin", tmp_path / "remote.bin", tmp_path / "down.bin"
    digest = random_file(src)
    target = "web-big-sftp"
    # Commands on stdin, not ``-b``: batch mode makes sftp run ssh with BatchMode=yes (no password prompt).
    r = subprocess.run(["sftp", *ssh_options(sshproxy), "-P", str(sshproxy.port()), f"{sshproxy.login}@{target}@127.0.0.1"],
                       input=f"put {src} {remote}\nget {remote} {back}\nbye\n", capture_output=True, text=True,
                       env=client_env(sshproxy), timeout=300)
    assert r.returncode == 0, r.stderr
    assert remote.stat().st_size == SIZE and back.stat().st_size == SIZE
    assert sha256_of(remote) == digest and sha256_of(back) == digest

    evs = events(sshproxy, lambda es: len(ended(es, sessions_to(es, target))) == 1, timeout=30)
    (sid,) = sessions_to(evs, target)
    files = [e for e in evs if e["event"] == "ssh.sftp.file" and e.get("sid") == sid]
    upload, download = files
    assert (upload["path"], upload["mode"], upload["bytes_written"], upload["sha256_written"]) == \
        (str(remote), "write", SIZE, digest)
    assert (download["path"], download["mode"], download["bytes_read"], download["sha256_read"]) == \
        (str(remote), "read", SIZE, digest)


@pytest.mark.parametrize("legacy", [False, True], ids=["scp-over-sftp", "scp-legacy"])
def test_scp_50mb_both_ways(sshproxy, tmp_path, legacy):  # noqa: F811
    """OpenSSH 9's scp speaks SFTP (the audit hashes each file); ``-O`` is the legacy protocol, an exec of
    ``scp -t``/``scp -f`` whose channel carries the file plus a few header bytes (counted in ``ssh.channel.end``)."""
    require_binary("scp")
    src, remote, back = tmp_path / "src.bin", tmp_path / "remote.bin", tmp_path / "back.bin"
    digest = random_file(src)
    target = f"web-big-scp{int(legacy)}"
    base = ["scp", *ssh_options(sshproxy), "-P", str(sshproxy.port()), *(["-O"] if legacy else [])]
    where = f"{sshproxy.login}@{target}@127.0.0.1:{remote}"
    for args in ([str(src), where], [where, str(back)]):
        r = subprocess.run([*base, *args], capture_output=True, text=True, env=client_env(sshproxy),
                           stdin=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 0, r.stderr
    assert remote.stat().st_size == SIZE and back.stat().st_size == SIZE
    assert sha256_of(remote) == digest and sha256_of(back) == digest

    evs = events(sshproxy, lambda es: len(ended(es, sessions_to(es, target))) == 2, timeout=30)
    sids = sessions_to(evs, target)
    mine = [e for e in evs if e.get("sid") in sids]
    if legacy:
        ends = {e["command"]: e for e in mine if e["event"] == "ssh.channel.end" and e["channel_type"] == "exec"}
        (put,) = [e for c, e in ends.items() if c.startswith("scp") and " -t " in c and str(remote) in c]
        (get,) = [e for c, e in ends.items() if c.startswith("scp") and " -f " in c and str(remote) in c]
        assert put["exit_status"] == 0 and get["exit_status"] == 0
        # RCP protocol: a "C0644 <size> <name>\n" header, the bytes, a NUL; the other side acknowledges with NULs.
        assert SIZE < put["bytes_from_client"] < SIZE + 256, put
        assert put["bytes_to_client"] < 16, put
        assert SIZE < get["bytes_to_client"] < SIZE + 256, get
        assert get["bytes_from_client"] < 16, get
    else:
        files = [e for e in mine if e["event"] == "ssh.sftp.file"]
        assert sorted((e["mode"], e["path"], e.get("bytes_written") or e.get("bytes_read"),
                       e.get("sha256_written") or e.get("sha256_read")) for e in files) == \
            [("read", str(remote), SIZE, digest), ("write", str(remote), SIZE, digest)]


def test_50_concurrent_sessions(sshproxy):  # noqa: F811
    n = 50
    procs = [subprocess.Popen(["ssh", *ssh_options(sshproxy), "-p", str(sshproxy.port()),
                               f"{sshproxy.login}@web-many{i}@127.0.0.1", f"echo session-{i}; sleep 1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(sshproxy),
                              stdin=subprocess.DEVNULL) for i in range(n)]
    results = []
    try:
        for p in procs:
            results.append((*p.communicate(timeout=180), p.returncode))
    finally:
        for p in procs:
            p.kill()
    failed = [(i, rc, err) for i, (out, err, rc) in enumerate(results) if rc != 0]
    assert not failed, failed
    assert [out for out, _, _ in results] == [f"session-{i}\n" for i in range(n)]

    def sids(es: list[dict]) -> dict:
        return {e["sid"]: e["requested_target"] for e in es if e["event"] == "ssh.session.start"
                and str(e.get("requested_target")).startswith("web-many")}

    evs = events(sshproxy, lambda es: len(ended(es, set(sids(es)))) >= n, timeout=60)
    starts = [e for e in evs if e["event"] == "ssh.session.start" and str(e.get("requested_target")).startswith("web-many")]
    assert len(starts) == n and all(e["success"] for e in starts)
    assert len({e["sid"] for e in starts}) == n
    assert sorted(e["requested_target"] for e in starts) == sorted(f"web-many{i}" for i in range(n))
    ends = ended(evs, {e["sid"] for e in starts})
    assert len(ends) == n and len({e["sid"] for e in ends}) == n
    channel_ends = [e for e in evs if e["event"] == "ssh.channel.end" and e.get("sid") in {s["sid"] for s in starts}]
    assert len(channel_ends) == n and all(e["exit_status"] == 0 for e in channel_ends)


def test_100mb_of_exec_output(sshproxy):  # noqa: F811
    total = 100_000_000
    target = "web-flood"
    p = subprocess.Popen(["ssh", *ssh_options(sshproxy), "-p", str(sshproxy.port()), f"{sshproxy.login}@{target}@127.0.0.1",
                          f"head -c {total} /dev/zero | tr '\\0' x"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(sshproxy),
                         stdin=subprocess.DEVNULL)
    count = xs = 0
    try:
        while chunk := p.stdout.read(CHUNK):
            count += len(chunk)
            xs += chunk.count(b"x")
        err = p.stderr.read()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert count == total and xs == total

    evs = events(sshproxy, lambda es: len(ended(es, sessions_to(es, target))) == 1, timeout=30)
    (sid,) = sessions_to(evs, target)
    (channel,) = [e for e in evs if e["event"] == "ssh.channel.end" and e.get("sid") == sid]
    assert (channel["exit_status"], channel["bytes_to_client"], channel["bytes_from_client"]) == (0, total, 0)
    (end,) = ended(evs, {sid})
    assert (end["bytes_to_client"], end["bytes_from_client"]) == (total, 0), end
