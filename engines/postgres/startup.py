"""Which of a client's startup parameters reach the backend (sans-IO).

A StartupMessage (PostgreSQL protocol §55.7) carries four protocol words —
``user``, ``database``, ``options``, ``replication``, matched case-sensitively
by PostgreSQL's ``ProcessStartupPacket`` — plus ``_pq_.`` protocol options
and any number of run-time settings (GUCs), whose names PostgreSQL matches
case-insensitively (libpq sends ``datestyle`` / ``timezone`` from
PGDATESTYLE / PGTZ in lower case).

The rule, in one place:

- ``user`` and ``database`` are the route's (the proxy logs in itself);
  ``replication`` other than off is refused (a walsender session is not a
  SQL session the proxy can audit).
- Every other parameter is a setting and is passed on with its original
  name, except the *refused* settings below.
- ``options`` (PGOPTIONS) is split as the server splits it (``pg_split_opts``:
  whitespace separates, a backslash escapes the next character) and parsed as
  the server does (``process_postgres_switches``): ``-c name=value``,
  ``-cname=value`` and ``--name=value`` (a ``-`` in the name is ``_``).  Each
  setting is checked like a parameter and passed on, re-encoded, in the same
  order.  Other server switches (``-e``, ``-S``, ``-d``…) are refused: most are
  aliases of settings (``-O`` is ``allow_system_table_mods``, ``-d`` a log
  level) and would slip past the check.
- Refused, whatever the route: settings that change who the session is or
  what it may do (``role``, ``session_authorization``, ``is_superuser``,
  ``session_replication_role`` — it switches off triggers and foreign-key
  checks —, ``lo_compat_privileges``, ``allow_system_table_mods``), settings
  that load code into the backend (``*_preload_libraries``,
  ``dynamic_library_path``), and settings that change what the server records
  about the session (``log_*``, ``pgaudit.*``).  A read-only grant also refuses
  ``default_transaction_read_only`` / ``transaction_read_only`` (the proxy
  sets the first itself, ``backend.make_backend_read_only``); a grant that
  denies the ``SET`` command refuses every setting but the ones drivers send
  on every connection (``DRIVER_SETTINGS``).

A refusal is the native answer a server gives for a setting the user may not
change — FATAL 42501 ``permission denied to set parameter "…"`` — never a
silent drop.  SQL ``SET`` of the same names is a statement: audited, and
subject to the grant's statement policy like any other.
"""

from __future__ import annotations

from typing import Callable

import attrs

# Case-sensitive, as in PostgreSQL's ProcessStartupPacket: anything else is a setting.
PROTOCOL_WORDS = frozenset({"user", "database", "options", "replication"})

# Identity and privileges.
IDENTITY_SETTINGS = frozenset({
    "role", "session_authorization", "is_superuser", "session_replication_role",
    "lo_compat_privileges", "allow_system_table_mods",
})
# Code loaded into the backend process.
CODE_SETTINGS = frozenset({"local_preload_libraries", "session_preload_libraries", "shared_preload_libraries", "dynamic_library_path"})
# The server's own record of the session.
LOG_PREFIXES = ("log_", "pgaudit.")
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
# What drivers send on every connection (JDBC, libpq, npgsql): allowed even when SET is denied.
DRIVER_SETTINGS = frozenset({"application_name", "client_encoding", "datestyle", "timezone", "extra_float_digits", "intervalstyle", "search_path"})

_SPACE = " \t\n\v\f\r"  # C isspace(), what pg_split_opts splits on
_OFF = frozenset({"false", "off", "no", "0"})


@attrs.frozen
class SettingRefused(Exception):
    """A startup parameter the proxy will not pass on: the FATAL ErrorResponse to send."""

    sqlstate: str
    message: str
    detail: str | None = None

    def __str__(self) -> str:
        return f"{self.sqlstate} {self.message}" + (f" ({self.detail})" if self.detail else "")


def setting_key(name: str) -> str:
    """The name PostgreSQL looks a setting up by: case-insensitive (``guc_name_compare``),
    ``-`` read as ``_`` (``ParseLongOption``; harmless for parameters, which the server
    would reject with a ``-`` anyway)."""
    return name.replace("-", "_").lower()


def split_options(options: str) -> list[str]:
    """``pg_split_opts``: split on whitespace; a backslash takes the next character literally."""
    args: list[str] = []
    i, n = 0, len(options)
    while i < n:
        while i < n and options[i] in _SPACE:
            i += 1
        if i >= n:
            break
        arg: list[str] = []
        escaped = False
        while i < n:
            c = options[i]
            if c in _SPACE and not escaped:
                break
            if not escaped and c == "\\":
                escaped = True
            else:
                escaped = False
                arg.append(c)
            i += 1
        args.append("".join(arg))
    return args


def parse_options(options: str) -> list[tuple[str, str]]:
    """The (name, value) settings of an ``options`` string, in order (see the module docstring)."""
    args = split_options(options)
    settings: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            spec, how = arg[2:], "--"
        elif arg == "-c":
            if i >= len(args):
                raise SettingRefused("42601", "invalid command-line argument for server process: -c requires an argument")
            spec, how = args[i], "-c "
            i += 1
        elif arg.startswith("-c"):
            spec, how = arg[2:], "-c "
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            raise SettingRefused(
                "0A000",
                f'options switch "{arg[:2]}" is not passed on by the proxy',
                detail='only settings are: use "-c name=value" or "--name=value"',
            )
        else:
            raise SettingRefused("42601", f"invalid command-line argument for server process: {arg}")
        name, eq, value = spec.partition("=")
        if not eq or not name:
            raise SettingRefused("42601", f"{how}{spec} requires a value")
        settings.append((name.replace("-", "_"), value))
    return settings


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _SPACE or c == "\\" else c for c in text)


def join_options(settings: list[tuple[str, str]]) -> str:
    """An ``options`` string the server splits back into exactly ``settings``."""
    return " ".join(f"-c {_escape(name)}={_escape(value)}" for name, value in settings)


def refusal(name: str, *, read_only: bool = False, set_denied: str | None = None) -> SettingRefused | None:
    """Why the setting ``name`` may not be given at connection start, or None."""
    key = setting_key(name)
    detail = None
    if key in IDENTITY_SETTINGS:
        detail = "dbproxy decides the session's identity and privileges; use SQL in the session, where it is audited"
    elif key in CODE_SETTINGS:
        detail = "loading libraries at connection start is not allowed through dbproxy"
    elif key.startswith(LOG_PREFIXES):
        detail = "what the server logs about a session is not the client's to change through dbproxy"
    elif read_only and key in READ_ONLY_SETTINGS:
        detail = "the session is read-only (dbproxy role grant)"
    elif set_denied is not None and key not in DRIVER_SETTINGS:
        detail = f'your dbproxy roles deny SET (role policy "{set_denied}")'
    if detail is None:
        return None
    return SettingRefused("42501", f'permission denied to set parameter "{name}"', detail=detail)


def backend_settings(
    params: dict[str, str], *, read_only: bool = False, denied_command: Callable[[str], str | None] | None = None
) -> dict[str, str]:
    """The startup parameters to send the backend for a client's ``params`` (without
    user/database, which are the route's); raises ``SettingRefused``.

    ``_pq_.`` options must already be removed (the engine answers them with
    NegotiateProtocolVersion).
    """
    set_denied = denied_command("SET") if denied_command is not None else None
    out: dict[str, str] = {}
    for name, value in params.items():
        if name in ("user", "database"):
            continue
        if name == "replication":
            if value.lower() not in _OFF:
                raise SettingRefused(
                    "42501", "replication connections are not allowed through dbproxy",
                    detail=f'startup parameter replication="{value}"',
                )
            continue
        if name == "options":
            settings = parse_options(value)
            for sname, _ in settings:
                why = refusal(sname, read_only=read_only, set_denied=set_denied)
                if why is not None:
                    raise why
            if settings:
                out["options"] = join_options(settings)
            continue
        why = refusal(name, read_only=read_only, set_denied=set_denied)
        if why is not None:
            raise why
        out[name] = value
    return out


def setting(params: dict[str, str], name: str) -> str | None:
    """A setting from startup parameters by its case-insensitive name (``application_name``)."""
    key = setting_key(name)
    found = None
    for k, v in params.items():
        if k not in PROTOCOL_WORDS and setting_key(k) == key:
            found = v  # the server applies them in order: the last one wins
    return found
