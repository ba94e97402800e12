"""Throwaway X.509 CA and leaf certificates for test peers and proxy listeners.

Strategy: one self-signed CA per test run (``make_ca``), then leaf certs signed
by it (``make_cert``) — server certs (serverAuth, SAN localhost/127.0.0.1) for
PostgreSQL, Cassandra, the Mongo-wire server and the proxy's own listeners, and
client certs (clientAuth) for mTLS.  EC P-256 keys: generation is instant,
every TLS stack used here accepts them.  Keys are written unencrypted in PEM
(PKCS#8) with mode 0600; callers that hand a key to another OS user chown it.

Runnable: ``python -m scripts.peers.certs DIR`` writes a CA plus a localhost
server cert and a client cert into DIR and prints their paths as JSON.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_ca", "make_cert"]

_VALIDITY = datetime.timedelta(days=30)
# Clock skew between the generating host and a peer must not make a fresh cert
# "not yet valid".
_BACKDATE = datetime.timedelta(hours=1)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _load(ca: tuple[str | Path, str | Path]):
    cert_path, key_path = ca
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    return cert, key


def make_ca(dir: str | Path, name: str = "dbproxy test CA") -> tuple[Path, Path]:
    """Create a self-signed CA in *dir*; return ``(ca_cert_path, ca_key_path)``."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "ca.crt", d / "ca.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def make_cert(
    dir: str | Path,
    ca: tuple[str | Path, str | Path],
    name: str,
    sans: list[str] | tuple[str, ...] = ("localhost", "127.0.0.1"),
    client: bool = False,
) -> tuple[Path, Path]:
    """Issue a leaf cert with CN *name* signed by *ca*; return ``(cert_path, key_path)``.

    Server certs carry *sans* as DNS/IP SubjectAltNames (hostname checks use
    the SAN, RFC 6125 §6.4.4).  ``client=True`` makes a clientAuth cert whose
    CN is the user name PostgreSQL's ``cert`` auth maps; it keeps the SANs too,
    which is harmless.
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    cert_path, key_path = d / f"{stem}.crt", d / f"{stem}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m scripts.peers.certs DIR", file=sys.stderr)
        return 2
    d = Path(argv[0])
    ca = make_ca(d)
    server = make_cert(d, ca, "localhost")
    client = make_cert(d, ca, "client", client=True)
    print(json.dumps({
        "ca_cert": str(ca[0]), "ca_key": str(ca[1]),
        "server_cert": str(server[0]), "server_key": str(server[1]),
        "client_cert": str(client[0]), "client_key": str(client[1]),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
