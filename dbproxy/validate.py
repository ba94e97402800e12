"""Config validation helpers: one pass that names every problem by file, JSON path and expectation.

Strategy: a ``Validator`` is handed down the document; each section's
function (``dbproxy.config``, ``dbproxy.audit_config``, ``dbproxy.access``,
``dbproxy.identity.config``, an engine's ``validate_auth`` /
``validate_listener``) asks it for typed values and gets ``None`` back
after an error is recorded, so one run reports every mistake and an
operator fixes a file in one go.  Nothing here knows a section: the schema
lives with the code that uses it.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from .configtypes import SecretRef
from .errors import ConfigError, ConfigErrors


def read_json(path: str) -> Any:
    """The JSON document in ``path``; ``ConfigErrors`` naming the file if it is unreadable or not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigErrors([ConfigError(path, "", f"a readable file ({exc.strerror})")]) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigErrors([ConfigError(path, "", f"valid JSON ({exc})")]) from None


class Validator:
    """Collects every problem of one file as ``ConfigError(file, json_path, expected)``.

    Each checker returns the value or ``None`` (after recording the error), so a
    section's validation goes on past a bad key and reports the rest too.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.base = os.path.dirname(os.path.abspath(file))
        self.errors: list[ConfigError] = []

    def err(self, path: str, expected: str) -> None:
        self.errors.append(ConfigError(self.file, path, expected))

    def obj(self, value: Any, path: str, what: str = "an object") -> dict | None:
        if not isinstance(value, dict):
            self.err(path, f"{what}, got {kind_of(value)}")
            return None
        return value

    def section(self, value: Any, path: str, allowed: set[str], what: str = "an object") -> dict | None:
        """An object whose keys must all be in ``allowed`` (the common shape of a config section)."""
        d = self.obj(value, path, what)
        if d is not None:
            self.unknown_keys(d, allowed, path)
        return d

    def unknown_keys(self, d: dict, allowed: set[str], path: str) -> None:
        for key in d:
            if key not in allowed:
                self.err(join(path, key), f"no key {key!r} here (allowed: {', '.join(sorted(allowed))})")

    def string(self, d: dict, key: str, path: str, *, required: bool = True, choices: tuple | None = None) -> str | None:
        p = join(path, key)
        if key not in d:
            if required:
                self.err(path, f"a key {key!r}" + (f" (one of {', '.join(choices)})" if choices else " (a string)"))
            return None
        value = d[key]
        if not isinstance(value, str) or not value:
            self.err(p, f"a non-empty string, got {kind_of(value)}")
            return None
        if choices is not None and value not in choices:
            self.err(p, f"one of {', '.join(choices)}, got {value!r}")
            return None
        return value

    def integer(self, d: dict, key: str, path: str, *, minimum: int = 1, required: bool = False) -> int | None:
        if key not in d:
            if required:
                self.err(path, f"a key {key!r} (an integer)")
            return None
        value = d[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.err(join(path, key), f"an integer >= {minimum}, got {value!r}")
            return None
        return value

    def number(self, d: dict, key: str, path: str, *, minimum: float = 0.0) -> float | None:
        if key not in d:
            return None
        value = d[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
            self.err(join(path, key), f"a number >= {minimum}, got {value!r}")
            return None
        return float(value)

    def boolean(self, d: dict, key: str, path: str, default: bool = False) -> bool:
        if key not in d:
            return default
        value = d[key]
        if not isinstance(value, bool):
            self.err(join(path, key), f"true or false, got {kind_of(value)}")
            return default
        return value

    def file_path(self, d: dict, key: str, path: str, *, required: bool = True, must_exist: bool = True) -> str | None:
        value = self.string(d, key, path, required=required)
        if value is None:
            return None
        resolved = value if os.path.isabs(value) else os.path.join(self.base, value)
        if must_exist and not os.path.isfile(resolved):
            self.err(join(path, key), f"a readable file, but {resolved} does not exist")
            return None
        return resolved

    def address(self, d: dict, key: str, path: str) -> tuple[str, int] | None:
        value = self.string(d, key, path)
        if value is None:
            return None
        host, sep, port_text = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not (0 <= int(port_text) <= 65535):
            self.err(join(path, key), f"\"host:port\" with a port 0-65535, got {value!r}")
            return None
        return host, int(port_text)

    def secret(self, d: dict, path: str, *, required: bool) -> SecretRef | None:
        if "password" in d:
            self.err(join(path, "password"), "no inline password: use \"password_file\" or \"password_env\"")
            return None
        has_file, has_env = "password_file" in d, "password_env" in d
        if has_file and has_env:
            self.err(path, "only one of \"password_file\" or \"password_env\"")
            return None
        if has_file:
            f = self.file_path(d, "password_file", path)
            return SecretRef(file=f) if f else None
        if has_env:
            name = self.string(d, "password_env", path)
            if name is None:
                return None
            if name not in os.environ:
                self.err(join(path, "password_env"), f"environment variable {name} to be set")
                return None
            return SecretRef(env=name)
        if required:
            self.err(path, "\"password_file\" or \"password_env\" for this auth method")
        return None


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
