"""The outbound agent: targets the proxy cannot reach, reached through an agent that dials out.

Core-level (names no protocol).  ``link`` — one HTTP/2 connection (sans-IO
``h2``) as trio streams, for both roles; ``hello`` — the JSON line each way
before it; ``tokens`` — node tokens; ``hub`` — the proxy's side (the
``agents`` listener, connected agents per node, ``dial``); ``client`` — the
agent itself (allow-list, backoff); ``cli`` — ``dbproxy agent``; ``config`` —
the ``agents`` section and a backend's ``via``.  See docs/agent.md.
"""
