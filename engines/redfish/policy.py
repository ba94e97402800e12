"""Per-role Redfish policy: method + path globs + action with parameter allow-lists (sans-IO, no trio).

Strategy.  Deny by default.  A role's ``redfish`` key is a list of rules;
a request is allowed when any rule of any granting role allows it:

    {"methods": ["GET", "HEAD"], "paths": ["/redfish/v1", "/redfish/v1/Systems/*"]}
    {"methods": ["PATCH"], "paths": ["/redfish/v1/Systems/*"]}
    {"actions": {"ComputerSystem.Reset": {"ResetType": ["On", "GracefulShutdown", "GracefulRestart"]}},
     "paths": ["/redfish/v1/Systems/*"]}

- ``methods``: HTTP methods (default ``["POST"]`` for a rule with
  ``actions``, else required).  ``paths``: globs on the normalised path
  (``fnmatch``: ``*`` also crosses ``/``, so ``/redfish/v1/Systems/*`` is
  everything under Systems; default ``["*"]`` for a rule with ``actions``).
- A request is an *action* when it is a POST to ``…/Actions/<Name>``
  (Redfish spec DSP0266 §6.4 "POST (action)"): only rules with ``actions``
  naming it allow it, and each parameter of its JSON body must be listed
  with its allowed values (``["*"]``: any value).  A parameter the rule does
  not list refuses the request: an allow-list, not a deny-list.
- Sessions and accounts (``/redfish/v1/SessionService``,
  ``/redfish/v1/AccountService``) are the BMC's credentials: a rule reaches
  them only when one of its path globs starts with that prefix itself, so
  ``/redfish/v1/*`` never grants them.

Paths are checked as the BMC will read them: a path with ``.``/``..``
segments, an empty segment, a backslash or a percent-encoded ``/ \\ .``
is refused (``bad_path``) rather than normalised, so a glob cannot be
sidestepped by spelling; a trailing ``/`` is ignored
(``/redfish/v1/`` is ``/redfish/v1``, DSP0266 §6.1.1 treats them alike).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable

import attrs

# Redfish resources whose reads or writes hand out or change the BMC's credentials.
PROTECTED_PREFIXES = ("/redfish/v1/SessionService", "/redfish/v1/AccountService")
METHODS = ("GET", "HEAD", "POST", "PATCH", "PUT", "DELETE")
RULE_KEYS = {"methods", "paths", "actions"}
_ACTION = re.compile(r"/Actions/([A-Za-z0-9_.#-]+)$")
_BAD_ESCAPE = re.compile(r"%(2[eEfF]|5[cC])")


class BadPath(ValueError):
    """A path the proxy refuses to interpret (the message says why)."""


def normalize_path(target_path: str) -> str:
    """The path a policy matches: no trailing ``/``; ``BadPath`` for a spelling that could hide another path."""
    path = target_path
    if not path.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    if "\\" in path or _BAD_ESCAPE.search(path):
        raise BadPath("the path holds a backslash or an encoded '/', '\\' or '.'")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        raise BadPath("the path holds a control character or a space")
    while len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    segments = path.split("/")[1:]
    if path != "/" and any(s in ("", ".", "..") for s in segments):
        raise BadPath("the path holds an empty, '.' or '..' segment")
    return path


def action_of(method: str, path: str) -> str | None:
    """``ComputerSystem.Reset`` for ``POST …/Actions/ComputerSystem.Reset``; None when not an action."""
    if method != "POST":
        return None
    m = _ACTION.search(path)
    if m is None:
        return None
    name = m.group(1)
    return name[1:] if name.startswith("#") else name


def protected(path: str) -> str | None:
    for prefix in PROTECTED_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


@attrs.frozen
class Rule:
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    # action name → (parameter → allowed values); None: a rule for plain requests, not actions.
    actions: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] | None = None

    def _path_ok(self, path: str) -> bool:
        prefix = protected(path)
        for glob in self.paths:
            if prefix is not None and not glob.startswith(prefix):
                continue  # only a glob naming the prefix itself reaches sessions and accounts
            if fnmatch.fnmatchcase(path, glob):
                return True
        return False

    def allows(self, method: str, path: str, action: str | None, params: dict | None) -> tuple[bool, str | None]:
        """(allowed, why not when this rule names the action but refuses its parameters)."""
        if method not in self.methods or not self._path_ok(path):
            return False, None
        if action is None:
            return self.actions is None, None
        if self.actions is None:
            return False, None
        for name, allowed in self.actions:
            if name != action:
                continue
            allowed_map = dict(allowed)
            for key, value in (params or {}).items():
                if key not in allowed_map:
                    return False, f"parameter {key!r} of {action} is not allowed"
                values = allowed_map[key]
                if "*" in values:
                    continue
                if not isinstance(value, str) or value not in values:
                    return False, f"{key}={value!r} is not allowed for {action} (allowed: {', '.join(values)})"
            return True, None
        return False, None


@attrs.frozen
class Decision:
    allowed: bool
    reason: str = ""  # audit reason code when refused: no_rule, parameter_not_allowed, protected_resource
    message: str = ""  # what the client is told


@attrs.frozen
class Policy:
    rules: tuple[Rule, ...]
    unrestricted: bool = False  # no RBAC configured: everything but the protected resources

    @classmethod
    def from_grant(cls, values: Iterable[tuple[Rule, ...]] | None) -> "Policy":
        if values is None:
            return cls((), unrestricted=True)
        return cls(tuple(rule for rules in values for rule in rules))

    def decide(self, method: str, path: str, action: str | None, params: dict | None) -> Decision:
        if self.unrestricted:
            if protected(path):
                return Decision(False, "protected_resource",
                                f"{path} holds the BMC's sessions or accounts: no role grants it on this proxy")
            return Decision(True)
        why = None
        for rule in self.rules:
            ok, reason = rule.allows(method, path, action, params)
            if ok:
                return Decision(True)
            why = why or reason
        if why is not None:
            return Decision(False, "parameter_not_allowed", why)
        what = f"action {action}" if action else f"{method} {path}"
        if protected(path):
            return Decision(False, "protected_resource", f"your roles do not allow {what} (the BMC's sessions and "
                                                         "accounts are reached only by a rule that names them)")
        return Decision(False, "no_rule", f"your roles do not allow {what}")


# --------------------------------------------------------------------------- config


def validate_rules(v: Any, value: Any, path: str) -> tuple[Rule, ...] | None:
    """A role's ``redfish`` key: an array of rules (see the module docstring)."""
    if not isinstance(value, list):
        v.err(path, 'an array of rules ({"methods": [...], "paths": [...], "actions": {...}})')
        return None
    rules: list[Rule] = []
    for i, item in enumerate(value):
        rp = f"{path}[{i}]"
        d = v.section(item, rp, RULE_KEYS)
        if d is None:
            continue
        actions = None
        if "actions" in d:
            actions = _actions(v, d["actions"], f"{rp}.actions")
        methods = _strings(v, d, "methods", rp, default=("POST",) if "actions" in d else None)
        for j, m in enumerate(methods or ()):
            if m not in METHODS:
                v.err(f"{rp}.methods[{j}]", f"one of {', '.join(METHODS)}, got {m!r}")
        if "actions" in d and methods and methods != ("POST",):
            v.err(f"{rp}.methods", 'only ["POST"] for a rule with "actions" (Redfish actions are POSTs)')
        paths = _strings(v, d, "paths", rp, default=("*",) if "actions" in d else None)
        for j, g in enumerate(paths or ()):
            if not g.startswith("/") and g != "*":
                v.err(f"{rp}.paths[{j}]", f"a glob on the absolute path (e.g. /redfish/v1/Systems/*), got {g!r}")
        if methods is None or paths is None or ("actions" in d and actions is None):
            continue
        rules.append(Rule(methods=methods, paths=paths, actions=actions))
    return tuple(rules)


def _strings(v: Any, d: dict, key: str, path: str, *, default: tuple | None) -> tuple[str, ...] | None:
    if key not in d:
        if default is None:
            v.err(path, f'a key "{key}" (an array of strings)')
        return default
    value = d[key]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        v.err(f"{path}.{key}", "a non-empty array of non-empty strings")
        return None
    return tuple(value)


def _actions(v: Any, value: Any, path: str) -> tuple | None:
    d = v.obj(value, path, 'an object of action name → {parameter: [allowed values]} (e.g. '
                           '{"ComputerSystem.Reset": {"ResetType": ["On"]}})')
    if d is None:
        return None
    out = []
    ok = True
    for name, params in d.items():
        ap = f"{path}.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.[A-Za-z0-9_-]+", name):
            v.err(ap, f"an action name like ComputerSystem.Reset, got {name!r}")
            ok = False
            continue
        pd = v.obj(params, ap, "an object of parameter → [allowed values] ({} for an action without parameters)")
        if pd is None:
            ok = False
            continue
        allowed = []
        for pname, values in pd.items():
            if not isinstance(values, list) or not values or not all(isinstance(x, str) and x for x in values):
                v.err(f"{ap}.{pname}", 'a non-empty array of allowed values (strings; ["*"] for any)')
                ok = False
                continue
            allowed.append((pname, tuple(values)))
        out.append((name, tuple(allowed)))
    return tuple(out) if ok else None
