"""The CQL native protocol, sans-IO: one namespace over its four modules.

Callers that use the whole protocol (the engine, the stages, the tests)
import this as ``F``; each name lives in the module of its concern:

* ``frames``    — the envelope: header, opcodes, versions, v3/v4 per-frame
  compression, ``Frame``, header checks and ``CqlProtocolError``
  (v4 spec sections 2 and 5, v5 sections 2-3);
* ``body``      — the notations (section 3) and the body prefix (v4 2.2 / v5 4);
* ``requests``  — request bodies (section 4.1);
* ``responses`` — response bodies and error codes (section 4.2, v4 9 / v5 8).

``segments.py`` (v5 framing) and ``codec.py`` (the decoder) sit beside them.
"""

from __future__ import annotations

from .body import *  # noqa: F401,F403
from .frames import *  # noqa: F401,F403
from .requests import *  # noqa: F401,F403
from .responses import *  # noqa: F401,F403
