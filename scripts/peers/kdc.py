"""A throwaway MIT Kerberos realm for GSSAPI tests.

Strategy: everything lives under one directory of the caller's — our own
``krb5.conf`` and ``kdc.conf`` (found through ``KRB5_CONFIG`` /
``KRB5_KDC_PROFILE``; /etc/krb5.conf, written by Debian's krb5-config with a
foreign default realm, is never read), the principal database made by
``kdb5_util create -s`` with a random master password, and ``krb5kdc -n``
(foreground, so we own its process) on a loopback port free for UDP and TCP.
DNS is switched off entirely (``dns_lookup_kdc``/``rdns``/
``dns_canonicalize_hostname`` false) and ``localhost`` maps to the realm, so
service principals are ``svc/localhost@REALM`` and clients must use the host
name ``localhost``.

Principals are added with ``kadmin.local`` (direct database access, no
kadmind).  Keytabs are exported with ``-norandkey`` so exporting never bumps
the key version; ``rotate_key`` does bump it on purpose, which leaves every
keytab exported before stale ("wrong key") for failure tests.

The realm always holds ``dbproxy@REALM`` with a keytab at ``proxy_keytab``:
the identity the proxy uses to log in to GSS backends.

Runnable: ``python -m scripts.peers.kdc`` starts a realm, prints its
connection info as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port_tcp_udp, wait_for_interrupt, wait_for_tcp

__all__ = ["KdcRealm", "start_realm", "KerberosError"]

_KRB5KDC = shutil.which("krb5kdc", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "krb5kdc"
_KDB5_UTIL = shutil.which("kdb5_util", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "kdb5_util"
_KADMIN_LOCAL = shutil.which("kadmin.local", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "kadmin.local"
_KINIT = shutil.which("kinit", path="/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")) or "kinit"

# kadmin.local exits 0 even when a request fails; these stderr lines are its
# only chatter that is not an error.
_KADMIN_NOISE = ("No policy specified", "Authenticating as principal", "WARNING: no policy specified")


class KerberosError(RuntimeError):
    pass


_KRB5_CONF = """\
[libdefaults]
    default_realm = {realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    udp_preference_limit = 1
    forwardable = true
    ticket_lifetime = 10h
    default_ccache_name = FILE:{dir}/ccache_%{{uid}}

[realms]
    {realm} = {{
        kdc = 127.0.0.1:{port}
    }}

[domain_realm]
    localhost = {realm}
    .localhost = {realm}
    127.0.0.1 = {realm}
"""

_KDC_CONF = """\
[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}

[realms]
    {realm} = {{
        database_name = {dir}/principal
        key_stash_file = {dir}/stash
        acl_file = {dir}/kadm5.acl
        max_life = 10h
        max_renewable_life = 7d
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{dir}/kdc.log
    admin_server = FILE:{dir}/kadmin.log
"""
# udp_preference_limit = 1: always TCP, so a stopped KDC shows up as an
# immediate "connection refused" instead of UDP retries and timeouts.


@attrs.define(eq=False)
class KdcRealm:
    realm: str
    dir: Path
    port: int
    krb5_conf: Path
    kdc_conf: Path
    proxy_principal: str
    proxy_keytab: Path
    _proc: subprocess.Popen | None = None

    # -- environment -----------------------------------------------------
    def env(self) -> dict[str, str]:
        """Variables that point MIT krb5 (libpq, python-gssapi, kinit) at this realm."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            # Replay caches of throwaway acceptors would otherwise pile up in /var/tmp.
            "KRB5RCACHETYPE": "none",
        }

    def _run_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
        env.update(self.env())
        return env

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    # -- administration --------------------------------------------------
    def kadmin(self, query: str) -> str:
        """Run one ``kadmin.local`` request; raise KerberosError if it failed."""
        p = subprocess.run(
            [_KADMIN_LOCAL, "-r", self.realm, "-q", query],
            env=self._run_env(), capture_output=True, text=True, cwd=self.dir,
        )
        errors = [
            line for line in p.stderr.splitlines()
            if line.strip() and not line.startswith(_KADMIN_NOISE)
        ]
        if p.returncode != 0 or errors:
            raise KerberosError(f"kadmin.local {query.split()[0]}: {'; '.join(errors) or p.returncode}")
        return p.stdout

    def add_principal(self, name: str, *, maxlife: str | None = None,
                      expire: str | None = None, exist_ok: bool = False) -> str:
        """Create *name* with a random key; return the full principal name.

        *maxlife* (e.g. ``"5 seconds"``) caps its tickets' lifetime, *expire*
        (e.g. ``"now"``) sets the principal's own expiry — both for failure
        tests.  With *exist_ok* an existing principal is kept as it is.
        """
        princ = self.principal(name)
        if exist_ok and self.has_principal(princ):
            return princ
        opts = ""
        if maxlife is not None:
            opts += f' -maxlife "{maxlife}"'
        if expire is not None:
            opts += f' -expire "{expire}"'
        self.kadmin(f"addprinc -randkey{opts} {princ}")
        return princ

    def has_principal(self, name: str) -> bool:
        try:
            self.kadmin(f"getprinc {self.principal(name)}")
        except KerberosError:
            return False
        return True

    def keytab(self, principal: str, path: str | Path, owner: str | None = None) -> Path:
        """Export *principal*'s current keys to *path* (mode 0600, chowned to *owner*)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.kadmin(f"ktadd -k {path} -norandkey {self.principal(principal)}")
        os.chmod(path, 0o600)
        if owner is not None:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def rotate_key(self, principal: str) -> None:
        """New random key and kvno: keytabs exported before are stale from now on."""
        self.kadmin(f"cpw -randkey {self.principal(principal)}")

    def expire_principal(self, principal: str, when: str = "now") -> None:
        """Set the principal's expiry; the KDC refuses it tickets afterwards."""
        self.kadmin(f'modprinc -expire "{when}" {self.principal(principal)}')

    def kinit(self, principal: str, keytab: str | Path, ccache: str) -> None:
        """Fill *ccache* (e.g. ``FILE:/tmp/x``) with a TGT for *principal* from *keytab*."""
        p = subprocess.run(
            [_KINIT, "-kt", str(keytab), "-c", ccache, self.principal(principal)],
            env=self._run_env(), capture_output=True, text=True,
        )
        if p.returncode != 0:
            raise KerberosError(f"kinit {principal}: {p.stderr.strip()}")

    # -- process ---------------------------------------------------------
    def start(self) -> None:
        """(Re)start the KDC on the realm's port."""
        if self._proc is not None and self._proc.poll() is None:
            return
        log = open(self.dir / "krb5kdc.out", "ab")
        try:
            self._proc = subprocess.Popen(
                [_KRB5KDC, "-n", "-r", self.realm, "-P", str(self.dir / "krb5kdc.pid")],
                env=self._run_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_for_tcp("127.0.0.1", self.port, timeout=10, proc=self._proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the KDC (the database stays, ``start()`` brings it back)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the KDC and remove the realm directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KdcRealm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_realm(base_dir: str | Path, realm: str = "DBPROXY.TEST") -> KdcRealm:
    """Create a fresh realm under *base_dir* and start its KDC."""
    t0 = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="krb5-", dir=base_dir))
    # Readable by other users (the postgres server reads krb5.conf); keytabs
    # and the database stay 0600.
    os.chmod(d, 0o755)
    port = free_port_tcp_udp()
    krb5_conf, kdc_conf = d / "krb5.conf", d / "kdc.conf"
    krb5_conf.write_text(_KRB5_CONF.format(realm=realm, port=port, dir=d))
    kdc_conf.write_text(_KDC_CONF.format(realm=realm, port=port, dir=d))
    (d / "kadm5.acl").write_text(f"*/admin@{realm} *\n")
    kr = KdcRealm(
        realm=realm, dir=d, port=port, krb5_conf=krb5_conf, kdc_conf=kdc_conf,
        proxy_principal=f"dbproxy@{realm}", proxy_keytab=d / "dbproxy.keytab",
    )
    p = subprocess.run(
        [_KDB5_UTIL, "create", "-s", "-r", realm, "-P", secrets.token_urlsafe(24)],
        env=kr._run_env(), capture_output=True, text=True, cwd=d,
    )
    if p.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        raise KerberosError(f"kdb5_util create: {p.stderr.strip()}")
    try:
        kr.add_principal(kr.proxy_principal)
        kr.keytab(kr.proxy_principal, kr.proxy_keytab)
        kr.start()
    except Exception:
        kr.close()
        raise
    print(f"kdc: realm {realm} on 127.0.0.1:{port} up in {time.monotonic() - t0:.2f}s",
          file=sys.stderr)
    return kr


def _main() -> int:
    base = tempfile.mkdtemp(prefix="dbproxy-kdc-")
    try:
        with start_realm(base) as kr:
            print(json.dumps({
                "realm": kr.realm, "kdc": f"127.0.0.1:{kr.port}", "env": kr.env(),
                "proxy_principal": kr.proxy_principal, "proxy_keytab": str(kr.proxy_keytab),
            }, indent=2), flush=True)
            wait_for_interrupt()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
