"""The desktop session's policy and audit on the two directions (synchronous, no I/O, no trio).

Strategy.  ``DesktopPolicy`` is what the granting roles allow (``desktop``
role key): input unless *every* granting role is view-only (allows are a
union, as ``read_only``), the clipboard in a direction if *some* granting
role allows it; a session with no RBAC configured has input and no
clipboard (deny by default, like port forwarding).

``ClientStage`` sees every client message (``rfb.ClientMessage``):

- SetEncodings: remembered for the end event (what the viewer asked for);
  SetPixelFormat: handed to the server-side framer, whose update sizes
  depend on it;
- input (KeyEvent, PointerEvent, QEMU extended key event) under view-only:
  dropped, the first one audited (``desktop.session.access_denied``,
  ``desktop.input.refused``), the rest counted;
- ClientCutText: audited (``desktop.clipboard``: direction, size, SHA-256,
  the first bytes) and forwarded, or refused (dropped, audited as refused);
- key presses as text in ``desktop.keys`` events (flushed at Enter, every
  ``KEYS_CHUNK`` characters and at the end) only when the listener's
  ``audit_keys`` is on;
- recorded (``DesktopRecorder.client``) when forwarded; key events only with
  the listener's ``recording.input``.

``ServerStage`` sees what the server-side decoder hands out (``server.py``):
``Span`` s of framed bytes (updates and the other messages, as they arrive)
go to the recording through a view; a ServerCutText comes whole and is
audited and forwarded or refused; everything reaches the recording as it is
forwarded.  Audit events never carry a password: the
proxy's login happened before; typed text only with ``audit_keys``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import attrs

from dbproxy.access import audit_denial
from dbproxy.errors import AccessDenied
from dbproxy.sansio import drop

from . import rfb

# How many bytes of a clipboard text the audit shows (the rest is in size and SHA-256).
CLIPBOARD_PREVIEW = 64
KEYS_CHUNK = 256


@attrs.frozen
class DesktopPolicy:
    view_only: bool = False
    to_server: bool = False
    to_client: bool = False

    @classmethod
    def from_grant(cls, grant: Any) -> "DesktopPolicy":
        values = grant.policy("desktop") if grant is not None else None
        if values is None:  # no RBAC configured
            return cls()
        # A granting role that does not name the key: input allowed, no clipboard.
        every_view_only = len(values) == len(grant.roles) and all(v["view_only"] for v in values)
        return cls(view_only=every_view_only, to_server=any(v["to_server"] for v in values),
                   to_client=any(v["to_client"] for v in values))


@attrs.define(eq=False)
class DesktopState:
    """What the two stages share and the end event reports."""

    session: Any
    policy: DesktopPolicy
    recorder: Any = None
    record_input: bool = False
    audit_keys: bool = False
    on_pixel_format: Callable[..., None] | None = None
    sync_fence: bool = False  # the previous client message was a ClientFence with Request|SyncNext
    encodings: list | None = None
    input_dropped: int = 0
    clipboard_to_server: int = 0
    clipboard_to_client: int = 0
    clipboard_refused: int = 0
    keys: list = attrs.field(factory=list)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.session.audit is not None:
            self.session.audit.emit(kind, **fields)

    def clipboard(self, direction: str, text: bytes, allowed: bool, *, extended: bool = False) -> None:
        fields = {"direction": direction, "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest(),
                  "extended": extended}
        if not extended:
            fields["preview"] = text[:CLIPBOARD_PREVIEW].decode("latin-1")
        if allowed:
            self.emit("desktop.clipboard", success=True, **fields)
            if direction == "to_server":
                self.clipboard_to_server += 1
            else:
                self.clipboard_to_client += 1
            return
        self.clipboard_refused += 1
        reason = f"clipboard {direction.replace('_', ' ')} is not allowed by the session's roles"
        self.emit("desktop.clipboard", success=False, error=reason, **fields)
        audit_denial(self.session, AccessDenied(reason, reason="clipboard_denied"), stage="clipboard",
                     direction=direction)

    def typed(self, text: str) -> None:
        self.keys.append(text)
        if text == "\n" or sum(len(k) for k in self.keys) >= KEYS_CHUNK:
            self.flush_keys()

    def flush_keys(self) -> None:
        if self.keys:
            self.emit("desktop.keys", text="".join(self.keys))
            self.keys.clear()

    def end_fields(self) -> dict:
        self.flush_keys()
        return {"encodings": list(self.encodings or ()), "input_dropped": self.input_dropped,
                "clipboard_to_server": self.clipboard_to_server, "clipboard_to_client": self.clipboard_to_client,
                "clipboard_refused": self.clipboard_refused}


class ClientStage:
    name = "vnc-client"

    def __init__(self, state: DesktopState) -> None:
        self.state = state

    def handle(self, msg: rfb.ClientMessage, ctx: Any) -> Any:
        state = self.state
        t = msg.type
        if msg.is_input:
            if state.policy.view_only:
                if state.input_dropped == 0:
                    reason = "view-only session: keyboard and pointer input are not forwarded"
                    state.emit("desktop.input.refused", success=False, error=reason, message=msg.name)
                    audit_denial(state.session, AccessDenied(reason, reason="view_only"), stage="input")
                state.input_dropped += 1
                return drop()
            if msg.type != rfb.POINTER_EVENT:
                if state.audit_keys:
                    down, keysym = msg.key()
                    if down:
                        text = rfb.keysym_text(keysym)
                        if text:
                            state.typed(text)
                if not state.record_input:
                    return None
        elif t == rfb.CLIENT_CUT_TEXT:
            allowed = state.policy.to_server
            state.clipboard("to_server", msg.cut_text(), allowed, extended=msg.extended_cut_text)
            if not allowed:
                return drop()
        elif t == rfb.SET_ENCODINGS:
            state.encodings = list(msg.encodings())
        elif t == rfb.SET_PIXEL_FORMAT and state.on_pixel_format is not None:
            # After a SyncNext fence the server switches where it answers that fence (server.py).
            state.on_pixel_format(msg.pixel_format(), after_fence=state.sync_fence)
        sync = rfb.FENCE_SYNC_REQUEST
        state.sync_fence = t == rfb.CLIENT_FENCE and msg.fence_flags() & sync == sync
        if state.recorder is not None:
            state.recorder.client(msg.raw)
        return None


class ServerStage:
    name = "vnc-server"

    def __init__(self, state: DesktopState) -> None:
        self.state = state

    def handle(self, msg: Any, ctx: Any) -> Any:
        state = self.state
        if msg.kind == "span":  # framed bytes on their way (server.py): recorded without a copy
            if state.recorder is not None:
                view = msg.view()
                state.recorder.server(view)
                if type(view) is memoryview:
                    view.release()  # before the pipeline compacts the buffer it points into
            return None
        if msg.kind == "cut_text":
            allowed = state.policy.to_client
            text = msg.text if isinstance(msg.text, bytes) else str(msg.text).encode("latin-1", "replace")
            state.clipboard("to_client", text, allowed)
            if not allowed:
                return drop()
        if state.recorder is not None:
            state.recorder.server(msg.raw)
        return None
