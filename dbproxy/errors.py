"""The proxy's error tree.

Every error the proxy raises on purpose is a ``ProxyError``.  Protocol errors
carry a ``client_hint``: a short, safe sentence an engine may put in the
client's own wire-format error (Postgres ErrorResponse, CQL ERROR, Mongo
``ok: 0``).  The exception text itself may hold more detail for the log and
must still never contain secrets.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises deliberately."""


class ProtocolError(ProxyError):
    """A peer broke its wire protocol (or we cannot speak what it asks).

    ``client_hint`` is what to tell the client; it defaults to the message.
    """

    def __init__(self, message: str, *, client_hint: str | None = None) -> None:
        super().__init__(message)
        self.client_hint = client_hint if client_hint is not None else message


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A frame announced a length above the configured maximum."""

    def __init__(self, size: int, limit: int, *, what: str = "message") -> None:
        super().__init__(
            f"{what} of {size} bytes exceeds the maximum of {limit} bytes",
            client_hint=f"{what} too large ({size} bytes; the proxy allows {limit})",
        )
        self.size = size
        self.limit = limit


class BufferBudgetExceeded(RemoteProtocolError):
    """Holding this session's partly received message would take the proxy over its
    buffer budget (``buffers.budget_bytes``, see ``dbproxy.buffer.BufferBudget``).

    ``sqlstate`` 53200 (out_of_memory) is for engines that map it (PostgreSQL);
    the others render the ``client_hint`` in their own protocol's error.
    """

    sqlstate = "53200"

    def __init__(self, needed: int, free: int, limit: int) -> None:
        super().__init__(
            f"buffer budget exceeded: a partly received message needs {needed} bytes, "
            f"{free} of the proxy's {limit} bytes are free",
            client_hint=f"the proxy is out of buffer memory for this message ({needed} bytes needed, {free} free)",
        )
        self.needed = needed
        self.free = free
        self.limit = limit


class MessageTimeout(RemoteProtocolError):
    """A partly received message was not completed within ``buffers.message_timeout_seconds``."""

    def __init__(self, seconds: float, held: int) -> None:
        super().__init__(
            f"message not received in time: {held} bytes of a message held for {seconds:g} s without completing",
            client_hint=f"message not received in time (the proxy waits {seconds:g} s for a message to complete)",
        )
        self.seconds = seconds
        self.held = held


class MalformedMessage(RemoteProtocolError):
    """A message that frames correctly but whose body the audit cannot parse.

    The rule for every engine: such a message is refused before it is
    forwarded, audited as ``audit.malformed`` (``audit_fields``) and the
    session ends with the protocol's native error.  It carries only what the
    audit records: the message type (``type_name``, e.g. ``"Query"``, and
    ``type_code``, e.g. ``"Q"`` or an opcode), its length on the wire and at
    most ``PREFIX_BYTES`` of its wire bytes (header included).  An engine may
    set ``redacted`` and cut the prefix where a secret would begin.
    """

    PREFIX_BYTES = 64

    def __init__(
        self,
        message: str,
        *,
        client_hint: str | None = None,
        type_name: str,
        type_code: str | int | None = None,
        raw: bytes | bytearray | memoryview = b"",
        length: int | None = None,
    ) -> None:
        super().__init__(message, client_hint=client_hint)
        self.type_name = type_name
        self.type_code = type_code
        self.length = len(raw) if length is None else length
        self.prefix = bytes(raw[: self.PREFIX_BYTES])
        self.redacted = False

    def audit_fields(self) -> dict:
        """The fields of its ``audit.malformed`` event (the pipeline adds ``direction``)."""
        fields = {
            "message_type": self.type_name,
            "message_code": self.type_code,
            "length": self.length,
            "prefix_hex": self.prefix.hex(),
            "truncated": self.length > len(self.prefix),
            "error": str(self),
        }
        if self.redacted:
            fields["redacted"] = True
        return fields


class AccessDenied(ProxyError):
    """Identity or policy refuses what the client asked for."""

    def __init__(self, message: str, *, reason: str = "access denied") -> None:
        super().__init__(message)
        self.reason = reason


class AuthFailed(AccessDenied):
    """A client could not prove who it is.

    ``reason`` is a short code for the audit trail (``token_expired``,
    ``token_bad_signature``, ``token_revoked``, ``token_wrong_user``,
    ``token_malformed``, ``scram_no_match``, ``certificate_missing``,
    ``method_unavailable`` …); ``str(exc)`` adds detail for the log.  Neither
    ever holds the token.  ``token_id`` is set when a correctly signed token
    was refused (expired, revoked, other user), for forensics.
    """

    def __init__(self, message: str, *, reason: str, token_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.token_id = token_id


class ConfigError(ProxyError):
    """A configuration file is wrong.  Names the file, the JSON path and what was expected."""

    def __init__(self, file: str, path: str, expected: str) -> None:
        self.file = file
        self.path = path
        self.expected = expected
        super().__init__(f"{file}: {path or '<root>'}: expected {expected}")


class ConfigErrors(ProxyError):
    """Several ConfigErrors found in one pass, so an operator fixes them all at once."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class UpstreamError(ProxyError):
    """The backend is unreachable, refused us, or failed our authentication.

    ``client_hint`` is safe for the client; the message holds the detail for
    the log and the audit event.  ``kind`` is one of ``"connect"``, ``"auth"``,
    ``"tls"``, ``"protocol"``, ``"closed"``.
    """

    def __init__(self, message: str, *, kind: str, client_hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.client_hint = client_hint if client_hint is not None else message
