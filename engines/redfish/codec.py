"""What the Redfish engine changes in the messages it relays (sans-IO, no trio).

Strategy.  HTTP framing is h11's on both sides (the core's listener toward
the client, ``backend.py`` toward the BMC); this module is the small set of
pure functions that decide what crosses:

- ``client_request_headers``: the client's headers minus its credentials
  (``Authorization``, ``X-Auth-Token``, ``Cookie``), the hop-by-hop ones
  (RFC 9110 §7.6.1) and the framing ones (h11 writes its own), with
  ``Host`` set to the BMC; the proxy's BMC credential is added by the caller.
- ``bmc_response_headers``: the BMC's headers minus hop-by-hop and framing
  and anything that is a BMC credential (``X-Auth-Token``, ``Set-Cookie``,
  ``WWW-Authenticate``: the client authenticates to the proxy, not to the
  BMC); ``Location`` / ``Content-Location`` pointing at the BMC's own
  address become paths, so the client never learns the BMC's address or
  leaves the proxy.  A response body is streamed unchanged: Redfish links
  (``@odata.id``) are paths already (DSP0266 §9.5).
- ``redfish_error``: refusals as a Redfish error response (DSP0266 §9.7:
  ``{"error": {"code", "message", "@Message.ExtendedInfo": [...]}}``, codes
  of the Base message registry).
- ``parse_action_body``: an action's JSON body, capped (the policy needs its
  parameters; nothing else is buffered); ``bmc_message``: the message of a
  BMC's error body for the audit; ``redact``: secrets out of audited
  parameters (``UpdateService.SimpleUpdate`` has a ``Password``).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import attrs
import orjson

# An action's body is parsed to check its parameters; Redfish action bodies are a few hundred bytes.
MAX_ACTION_BODY = 64 * 1024
# A BMC error body read to find its message for the audit (larger ones are relayed unread).
MAX_ERROR_BODY = 64 * 1024

# RFC 9110 §7.6.1 hop-by-hop fields, and the framing fields h11 sets itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length", "host", "expect"}
# The client's credentials for the proxy: never forwarded to the BMC.
CLIENT_CREDENTIALS = {"authorization", "x-auth-token", "cookie"}
# What a BMC may say that is a credential or invites the client to log in to the BMC itself.
BMC_CREDENTIALS = {"x-auth-token", "set-cookie", "www-authenticate", "authorization"}

# Base message registry (DSP0266 §9.7, Base.1.x) ids for the proxy's own refusals.
MESSAGE_IDS = {
    400: "Base.1.0.MalformedJSON",
    401: "Base.1.0.NoValidSession",
    403: "Base.1.0.InsufficientPrivilege",
    404: "Base.1.0.ResourceMissingAtURI",
    408: "Base.1.0.GeneralError",
    413: "Base.1.0.GeneralError",
    421: "Base.1.0.GeneralError",
    431: "Base.1.0.GeneralError",
    500: "Base.1.0.InternalError",
    502: "Base.1.0.ServiceTemporarilyUnavailable",
    503: "Base.1.0.ServiceTemporarilyUnavailable",
    504: "Base.1.0.ServiceTemporarilyUnavailable",
}
_SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)


@attrs.frozen
class ErrorResponse:
    """A response the proxy makes itself (the engine hands it to the core as an ``HTTPResponse``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def redfish_error(status: int, message: str, *, code: str | None = None, resolution: str | None = None,
                  headers: tuple[tuple[str, str], ...] = ()) -> ErrorResponse:
    """A Redfish error response (DSP0266 §9.7) with the Base registry id for ``status``."""
    code = code or MESSAGE_IDS.get(status, "Base.1.0.GeneralError")
    info: dict[str, Any] = {"@odata.type": "#Message.v1_1_1.Message", "MessageId": code, "Message": message,
                            "Severity": "Critical", "MessageSeverity": "Critical"}
    if resolution:
        info["Resolution"] = resolution
    body = {"error": {"code": code, "message": message, "@Message.ExtendedInfo": [info]}}
    extra = headers
    if status == 401:
        # RFC 9110 §11.6.1: a 401 names a scheme; the proxy's (its tokens), never the BMC's.
        extra = (*extra, ("www-authenticate", 'Basic realm="dbproxy", charset="UTF-8"'))
    return ErrorResponse(status, (("content-type", "application/json; charset=utf-8"),
                                  ("odata-version", "4.0"), *extra), orjson.dumps(body))


def client_credentials(headers: tuple[tuple[str, str], ...]) -> tuple[str, str | None, str] | None:
    """(scheme, user, secret) from ``Authorization`` (Bearer TOKEN, or Basic with the token as password)
    or ``X-Auth-Token``; None when the client sent none.  ``("bad", None, why)`` for an unreadable one."""
    auth = token = None
    for k, v in headers:
        if k == "authorization" and auth is None:
            auth = v
        elif k == "x-auth-token" and token is None:
            token = v
    if auth is not None:
        scheme, _, rest = auth.strip().partition(" ")
        rest = rest.strip()
        if scheme.lower() == "bearer" and rest:
            return "bearer", None, rest
        if scheme.lower() == "basic" and rest:
            try:
                user, sep, password = base64.b64decode(rest, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return "bad", None, "the Basic credentials are not base64 of user:password"
            if not sep:
                return "bad", None, "the Basic credentials hold no ':'"
            return "basic", user or None, password
        return "bad", None, f"unsupported authorization scheme {scheme!r} (use Bearer or Basic)"
    if token is not None:
        # A Redfish client that logged in to a session (not offered by the proxy) repeats its token here.
        return "x-auth-token", None, token.strip()
    return None


def target_from_host(host: str | None) -> str | None:
    """``bmc-1.bmc.example.com:8443`` → ``bmc-1``: the first label of the Host header names the BMC."""
    if not host:
        return None
    name = host.strip()
    if name.startswith("["):
        return None  # an IPv6 literal names no BMC
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    label = name.split(".", 1)[0].lower()
    if not label or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", label) or label.isdigit():
        return None
    return label


def client_request_headers(headers: tuple[tuple[str, str], ...], bmc_host: str) -> list[tuple[str, str]]:
    out = [("host", bmc_host)]
    for k, v in headers:
        if k in HOP_BY_HOP or k in CLIENT_CREDENTIALS or k.startswith("proxy-"):
            continue
        out.append((k, v))
    return out


def bmc_response_headers(headers: list[tuple[bytes, bytes]], bmc_origins: tuple[str, ...]) -> list[tuple[str, str]]:
    """What the client gets of the BMC's response head (Content-Length kept: the body is streamed as is)."""
    out = []
    for kb, vb in headers:
        k, v = kb.decode("latin-1").lower(), vb.decode("latin-1")
        if k in BMC_CREDENTIALS or (k in HOP_BY_HOP and k != "content-length"):
            continue
        if k in ("location", "content-location"):
            v = local_location(v, bmc_origins)
        out.append((k, v))
    return out


def local_location(value: str, bmc_origins: tuple[str, ...]) -> str:
    """An absolute URL on the BMC becomes its path (the client reaches it through the proxy)."""
    lowered = value.lower()
    for origin in bmc_origins:
        if lowered.startswith(origin) and (len(value) == len(origin) or value[len(origin)] in "/?#"):
            return value[len(origin):] or "/"
    return value


def parse_action_body(body: bytes) -> dict:
    """An action's parameters (a JSON object); ``ValueError`` with what is wrong."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the action's body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("the action's body must be a JSON object of its parameters")
    return value


def bmc_message(body: bytes) -> str | None:
    """The message of a Redfish error body (``error.@Message.ExtendedInfo[0].Message``, else ``error.message``)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return text or None
    if not isinstance(value, dict) or not isinstance(value.get("error"), dict):
        return None
    err = value["error"]
    info = err.get("@Message.ExtendedInfo")
    if isinstance(info, list) and info and isinstance(info[0], dict) and isinstance(info[0].get("Message"), str):
        return info[0]["Message"][:500]
    msg = err.get("message")
    return msg[:500] if isinstance(msg, str) else None


def redact(params: Any) -> Any:
    """Parameters for the audit: values of keys that look like secrets replaced (nested too)."""
    if isinstance(params, dict):
        return {k: "***" if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v) for k, v in params.items()}
    if isinstance(params, list):
        return [redact(v) for v in params]
    return params
