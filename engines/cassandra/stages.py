"""The Cassandra engine's active stages (the audit observers are in ``observers.py``).

``SessionGuard`` (client → backend, first of the client stages, in both audit
modes): STARTUP / AUTH_RESPONSE after the handshake are answered with a
PROTOCOL_ERROR on their stream and never forwarded — a client's password
must not reach the backend, and the backend's framing must not change under
the proxy — audited as a refused query; the session goes on.  In a tapped
session it also carries out the tee's refusal of a request whose body does
not parse (``tap.Refused``: raised here, so the pump audits it as
``audit.malformed``, forwards the frames before it and ends the session with
PROTOCOL_ERROR, as the inline ``RequestAudit`` does).  It sees only the
frames the tee hands out as messages; everything else passes untouched.

The statement policy (``policy.CqlPolicy``) is the other active stage; a
session with one keeps its observers inline.
"""

from __future__ import annotations

from typing import Any

from dbproxy.audit import events as ev
from dbproxy.sansio import reply

from . import protocol as F

_STARTUP = F.Opcode.STARTUP
_AUTH_RESPONSE = F.Opcode.AUTH_RESPONSE


class SessionGuard:
    """Refuses handshake messages once the session runs (see the module docstring)."""

    name = "cql-session-guard"

    def __init__(self, audit: Any, *, compressor: str | None = None) -> None:
        self.audit = audit
        self.compressor = compressor

    def handle(self, msg: Any, ctx: Any) -> Any:
        op = msg.opcode
        if op == _STARTUP or op == _AUTH_RESPONSE:
            name = F.Opcode(op).name
            self.audit.emit(ev.QUERY, db_query=f"<{name} after the handshake: refused>", success=False, cql_opcode=name)
            message = f"Unexpected message {name}: the connection is already authenticated"
            return reply(F.encode_error(msg.version, msg.stream, F.ErrorCode.PROTOCOL_ERROR, message,
                                        compressor=self.compressor))
        refusal = getattr(msg, "refusal", None)
        if refusal is not None:
            raise refusal
        return None
