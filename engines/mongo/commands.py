"""Commands and the proxy's replies: what a request asks, whatever its opcode, and how to answer it.

Strategy: a stage that audits or polices a request wants one ``Command``
(name, ``$db``, collection, the lazy body, sequences), not three opcodes.
``inspect_command`` gets it from an OP_MSG body, from an OP_QUERY on
``<db>.$cmd`` (unwrapped from ``$query``) or, for a legacy find on a real
collection, as ``find`` on that collection — decompressing OP_COMPRESSED
first.  Replies the proxy originates follow the request's style: OP_REPLY
for OP_QUERY, OP_MSG otherwise (``reply_to``); an error is the server's
``{ok: 0.0, errmsg, code, codeName}`` (codes from mongo's error_codes.yml).
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
from bson.raw_bson import RawBSONDocument

from .compression import decompress
from .legacy import encode_op_reply, parse_op_query
from .opmsg import encode_op_msg, parse_op_msg
from .wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
    WireMessage,
    collection_name,
    command_name,
    database_name,
)

__all__ = [
    "Command", "inspect_command", "ERROR_CODE_NAMES", "error_document", "error_reply", "reply_to",
    "error_reply_for",
]

@attrs.frozen
class Command:
    """What a stage needs to audit or police one request, whatever its opcode.

    ``op_code`` is the opcode the command travelled in (after decompression);
    ``compressed`` says whether it arrived inside OP_COMPRESSED.  ``body`` is
    the command document (lazy).  ``sequences`` holds the OP_MSG document
    sequences (empty for OP_QUERY).
    """

    name: str
    database: str | None
    collection: str | None
    body: RawBSONDocument = attrs.field(repr=False)
    op_code: int
    request_id: int
    compressed: bool
    message: WireMessage = attrs.field(repr=False)  # the uncompressed message
    more_to_come: bool = False

    @property
    def sequences(self) -> dict[str, list[RawBSONDocument]]:
        if self.op_code != OP_MSG:
            return {}
        return parse_op_msg(self.message).sequences


def inspect_command(msg: WireMessage, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Command | None:
    """The command a client request carries, decompressing OP_COMPRESSED if needed.

    OP_MSG gives its body; OP_QUERY on ``<db>.$cmd`` gives the command
    (unwrapped from ``$query``); an OP_QUERY on a real collection (a legacy
    find) is reported as ``name="find"`` on that collection.  Other opcodes
    (replies, legacy OP_INSERT/OP_GET_MORE/...) carry no command: None.
    """
    compressed = msg.op_code == OP_COMPRESSED
    if compressed:
        msg = decompress(msg, max_message_size=max_message_size)
    if msg.op_code == OP_MSG:
        op = parse_op_msg(msg)
        body = op.body
        return Command(
            name=command_name(body),
            database=database_name(body),
            collection=collection_name(body),
            body=body,
            op_code=OP_MSG,
            request_id=msg.request_id,
            compressed=compressed,
            message=msg,
            more_to_come=op.more_to_come,
        )
    if msg.op_code == OP_QUERY:
        q = parse_op_query(msg)
        db, _, coll = q.full_collection_name.partition(".")
        if q.is_command:
            body = q.command()
            return Command(
                name=command_name(body),
                database=db,
                collection=collection_name(body),
                body=body,
                op_code=OP_QUERY,
                request_id=msg.request_id,
                compressed=compressed,
                message=msg,
            )
        return Command(
            name="find",
            database=db,
            collection=coll or None,
            body=q.query,
            op_code=OP_QUERY,
            request_id=msg.request_id,
            compressed=compressed,
            message=msg,
        )
    return None


# --- replies the proxy originates ----------------------------------------------

#: Server error code names for the codes the proxy uses (mongo's error_codes.yml).
ERROR_CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    8: "UnknownError",
    11: "UserNotFound",
    13: "Unauthorized",
    18: "AuthenticationFailed",
    59: "CommandNotFound",
    89: "NetworkTimeout",
    115: "CommandNotSupported",
    9001: "SocketException",
}


def error_document(code: int, errmsg: str, *, code_name: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"ok": 0.0, "errmsg": errmsg, "code": int(code)}
    name = code_name if code_name is not None else ERROR_CODE_NAMES.get(code)
    if name is not None:
        doc["codeName"] = name
    return doc


def error_reply(
    request_id_of_request: int,
    code: int,
    errmsg: str,
    *,
    op_msg: bool = True,
    code_name: str | None = None,
    request_id: int | None = None,
) -> bytes:
    """A command error ``{ok: 0.0, errmsg, code, codeName}`` answering a request.

    ``op_msg=True`` answers in OP_MSG (the request was OP_MSG); ``False``
    answers in OP_REPLY (the request was OP_QUERY).
    """
    doc = error_document(code, errmsg, code_name=code_name)
    if op_msg:
        return encode_op_msg(doc, request_id=request_id, response_to=request_id_of_request)
    return encode_op_reply([doc], request_id, request_id_of_request)


def reply_to(request: WireMessage, document: Mapping[str, Any] | bytes, *, request_id: int | None = None) -> bytes:
    """A reply document in the style of ``request`` (OP_QUERY → OP_REPLY, else OP_MSG)."""
    if request.effective_op_code == OP_QUERY:
        return encode_op_reply([document], request_id, request.request_id)
    return encode_op_msg(document, request_id=request_id, response_to=request.request_id)


def error_reply_for(request: WireMessage, code: int, errmsg: str, *, code_name: str | None = None) -> bytes:
    """``error_reply`` choosing the opcode style from the request itself."""
    return reply_to(request, error_document(code, errmsg, code_name=code_name))
