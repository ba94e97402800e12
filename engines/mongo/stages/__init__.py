"""Pipeline stages of the Mongo engine, one concern each.

Client → backend, in this order (the pipeline stops at the first stage that
returns a verdict):

  1. ``access.SessionGate``   — (with access control) before establishment: handshake commands only
                                (not audited), implicit establishment or refusal.
  2. ``audit.CommandAudit``   — observer: one ``db.session.query`` per command;
                                never changes anything (returns None), and runs
                                before every stage that may refuse.
  3. ``auth.ClientAuth``      — answers the authentication commands itself.
  4. ``access.AccessPolicy``  — (with access control) the session's grant: refuse (code 13), answer
                                ``connectionStatus``, end a legacy-opcode session.
  5. ``flow.InFlight``        — what is forwarded waits for its reply.
  6. ``handshake.HelloRewriter`` — hello without the fields the proxy answers.
  7. ``flow.Decompressed``    — an OP_COMPRESSED request goes on decompressed.

Backend → client: ``audit.ReplyAudit`` (observer: one ``db.session.result``),
``handshake.HelloReplyRewriter`` (a standalone server, the proxy's answers),
``flow.DecompressedReply``.

The stages share ``session.MongoSessionState`` and read each message once
(``state.request(msg)`` / ``state.reply(msg)``); ``render.py`` is what the
audit reads of commands and replies.  Stages are synchronous and do no I/O.
"""

from __future__ import annotations

from typing import Any

from .access import AccessPolicy, SessionGate
from .audit import CommandAudit, ReplyAudit
from .auth import ClientAuth
from .flow import Decompressed, DecompressedReply, InFlight
from .handshake import HELLO_COMMANDS, HelloReplyRewriter, HelloRewriter, rebuild_request
from .render import count_documents, cursor_summary, render_command, reply_document, summarize_reply
from .session import (
    HOST_UNREACHABLE,
    REQUEST_OPCODES,
    SUPPORTED_COMPRESSORS,
    MongoSessionState,
    abandon_pending,
    lost_backend_replies,
    malformed_request,
    protocol_error_reply,
)

__all__ = [
    "AccessPolicy", "ClientAuth", "CommandAudit", "Decompressed", "DecompressedReply", "HELLO_COMMANDS",
    "HOST_UNREACHABLE", "HelloReplyRewriter", "HelloRewriter", "InFlight", "MongoSessionState", "REQUEST_OPCODES",
    "ReplyAudit", "SUPPORTED_COMPRESSORS", "SessionGate", "abandon_pending", "backend_stages", "client_stages",
    "count_documents", "cursor_summary", "lost_backend_replies", "malformed_request", "protocol_error_reply",
    "rebuild_request", "render_command", "reply_document", "summarize_reply",
]


def client_stages(state: MongoSessionState, audit: Any) -> list:
    """The client → backend stages of one session, in pipeline order.

    The access stages are only there when ``state.gate`` is set (identity and
    access configured), as the engine does before building the pipeline;
    without it they would have nothing to do on every message.
    """
    gated = state.gate is not None
    return [
        *([SessionGate(state)] if gated else []),
        CommandAudit(state, audit),
        ClientAuth(state, audit),
        *([AccessPolicy(state, audit)] if gated else []),
        InFlight(state, audit),
        HelloRewriter(state, audit),
        Decompressed(state),
    ]


def backend_stages(state: MongoSessionState, audit: Any) -> list:
    """The backend → client stages of one session, in pipeline order."""
    return [ReplyAudit(state, audit), HelloReplyRewriter(state), DecompressedReply(state)]
