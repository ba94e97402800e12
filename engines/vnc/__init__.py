"""VNC (RFB) desktop sessions through the proxy (RFC 6143): handshake and client framing (rfb.py), the engine, framing, recording and rendering of the server stream (updates.py, recording.py)."""
