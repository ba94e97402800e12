"""The MongoDB wire protocol, sans-IO: one namespace over its modules.

Callers that use the whole protocol (the engine, the stages, the backend
login, the tests) import this as ``wire``; each name lives in the module of
its concern:

* ``wire``        — the MsgHeader, opcodes, ``WireMessage``, request ids,
  BSON document helpers;
* ``opmsg``       — OP_MSG sections, document sequences, CRC-32C (OP_MSG.md);
* ``legacy``      — OP_QUERY / OP_REPLY (MongoDB manual, "Legacy Opcodes");
* ``compression`` — OP_COMPRESSED and its compressors (OP_COMPRESSED.md);
* ``commands``    — the command a request carries; the proxy's replies.

Every parser raises ``RemoteProtocolError`` (re-exported here) on bad input.
"""

from __future__ import annotations

from dbproxy.errors import RemoteProtocolError  # noqa: F401

from .commands import *  # noqa: F401,F403
from .compression import *  # noqa: F401,F403
from .legacy import *  # noqa: F401,F403
from .opmsg import *  # noqa: F401,F403
from .wire import *  # noqa: F401,F403
