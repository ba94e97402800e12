"""What the PostgreSQL engine says to a client on its own: ErrorResponse frames
(§55.7) with the SQLSTATE each proxy error maps to."""

from __future__ import annotations

from dbproxy.errors import FrameTooLarge, ProtocolError, ProxyError, UpstreamError

from . import messages as m


def error_message(sqlstate: str, message: str, *, severity: str = "FATAL", detail: str | None = None, hint: str | None = None) -> bytes:
    return m.encode_error(severity, sqlstate, message, detail=detail, hint=hint)


def client_error_for(exc: ProxyError) -> bytes:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None and not isinstance(exc, UpstreamError):
        # e.g. AuditUnavailable (53000): the session ends with its own SQLSTATE.
        return error_message(sqlstate, getattr(exc, "client_hint", str(exc)))
    if isinstance(exc, FrameTooLarge):
        return error_message("54000", exc.client_hint)
    if isinstance(exc, ProtocolError):
        return error_message("08P01", f"protocol violation: {exc.client_hint}")
    if isinstance(exc, UpstreamError):
        return error_message(getattr(exc, "sqlstate", None) or "08006", exc.client_hint)
    return error_message("XX000", str(exc))
