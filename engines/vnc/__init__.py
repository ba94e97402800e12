"""VNC (RFB) desktop sessions through the proxy."""
