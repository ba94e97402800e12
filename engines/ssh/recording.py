"""The SSH engine's recordings: the core's engine-agnostic asciicast writer (``dbproxy.terminal.recording``).

Kept as a name for the engine's modules; see that module for the format and strategy.
"""

from __future__ import annotations

from dbproxy.terminal.recording import AsciicastWriter

__all__ = ["AsciicastWriter"]
