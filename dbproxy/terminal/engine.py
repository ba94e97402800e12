"""What terminal engines (SSH, Telnet) do alike in the session flow's hooks, over the core's identity.

A terminal client names ``LOGIN@TARGET`` and proves itself with a proxy token (or, SSH, a key);
the route may fix the login on the target.  ``TerminalEngine`` implements the flow hooks that
follow from that — token identification, the route's login, the refusals for no route and for
access denied — once; an engine adds its wire format's refusal details (SSH: a disconnect reason
code) through ``refusal`` and keeps the hooks that differ.
"""

from __future__ import annotations

from typing import Any

from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied
from dbproxy.flow import Refused, Request
from dbproxy.limits import TooManyConnections


class TerminalEngine(Engine):
    family = "terminal"
    # Extra keyword arguments of every ``Refused`` these hooks raise (SSH: its disconnect code).
    refusal: dict = {}
    # ... and of the refusal when token authentication is not configured.
    unconfigured_refusal: dict = {}

    def identify_by_token(self, session: Any, request: Request, secret: str | None) -> None:
        """``session.identity`` from the proxy token the client typed; refused (audited) otherwise."""
        if self.access is None or not self.access.auth.token:
            raise Refused(f"listener {self.listener.name}: token authentication is not configured",
                          client_message="the proxy cannot authenticate you (no token authentication configured)",
                          **self.unconfigured_refusal)
        try:
            session.identity = self.access.auth.verify_token(None, secret or "")
        except AccessDenied as exc:
            raise Refused(str(exc), client_message="authentication failed: the dbproxy token was not accepted",
                          fields={"reason": exc.reason}, cause=exc, stage="authenticate", **self.refusal) from None
        request.start_fields["identity_method"] = session.identity.method

    def check_route(self, session: Any, request: Request, route: Any) -> None:
        # The account on the target: the route's login, else the one the client asked for.
        session.login = route.backend.extra.get("login") or request.login
        session.details["requested_login"] = request.login

    def no_route(self, request: Request) -> Refused:
        return Refused(f"no route for target {request.target!r} and login {request.login!r} on listener "
                       f"{self.listener.name}", **self.refusal)

    def denied(self, session: Any, request: Request, exc: AccessDenied) -> Refused:
        if isinstance(exc, TooManyConnections):
            return Refused(str(exc), **self.refusal)
        return Refused(str(exc), client_message=f"access denied: you may not log in to {session.target!r} as "
                                                f"{session.login!r}", **self.refusal)
