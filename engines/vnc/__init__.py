"""VNC (RFB) desktop sessions: framing, recording and rendering of the server stream (RFC 6143)."""
