"""The plain config types shared by the core and the audit side (no validation here).

``dbproxy.config`` validates documents into them; ``dbproxy.tls`` builds
contexts from the TLS ones and ``audit.sinks`` builds sinks from
``SinkConfig`` — both import these types, never the validator, so no module
cycle runs between the config, TLS and the sinks.
"""

from __future__ import annotations

import os

import attrs


@attrs.frozen(repr=False)
class SecretRef:
    file: str | None = None
    env: str | None = None

    def reveal(self) -> str:
        if self.file is not None:
            with open(self.file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        value = os.environ.get(self.env or "")
        if value is None:
            raise KeyError(f"environment variable {self.env} is not set")
        return value

    def __repr__(self) -> str:
        where = f"file={self.file!r}" if self.file else f"env={self.env!r}"
        return f"SecretRef({where})"


@attrs.frozen
class BackendTLS:
    mode: str = "disable"
    ca_file: str | None = None
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@attrs.frozen
class ListenerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@attrs.frozen
class SinkConfig:
    type: str
    name: str
    path: str | None = None
    params: dict = attrs.field(factory=dict)
