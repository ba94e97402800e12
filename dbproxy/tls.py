"""TLS contexts for listeners (proxy as server) and backend links (proxy as client).

Backend modes follow libpq's sslmode names: ``require`` encrypts without
verifying, ``verify-ca`` checks the chain against ``ca_file``, ``verify-full``
also checks the host name (``server_name`` or the backend host).
"""

from __future__ import annotations

import ssl

import trio

from .configtypes import BackendTLS, ListenerTLS
from .errors import UpstreamError


def server_context(cfg: ListenerTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    if cfg.client_ca_file:
        ctx.load_verify_locations(cfg.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: BackendTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.mode == "require":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if cfg.ca_file:
            ctx.load_verify_locations(cfg.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = cfg.mode == "verify-full"
    if cfg.cert_file and cfg.key_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


async def wrap_backend(stream: trio.abc.Stream, cfg: BackendTLS, host: str, ctx: ssl.SSLContext | None = None) -> trio.SSLStream:
    """TLS-handshake a backend stream; failures become ``UpstreamError(kind="tls")``."""
    ctx = ctx or client_context(cfg)
    server_name = cfg.server_name or host
    tls = trio.SSLStream(stream, ctx, server_hostname=server_name, https_compatible=False)
    try:
        await tls.do_handshake()
    except (ssl.SSLError, ssl.CertificateError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ or exc
        raise UpstreamError(
            f"TLS handshake with backend {host} failed: {cause}",
            kind="tls",
            client_hint="the proxy could not establish a verified TLS connection to the backend database",
        ) from None
    return tls


def peer_cert_der(stream: trio.SSLStream) -> bytes | None:
    return stream.getpeercert(binary_form=True)
