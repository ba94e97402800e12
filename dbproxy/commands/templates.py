"""Command templates: their config schema, parameter validation and the command line a target runs.

Strategy.  A template is a fixed argv whose elements are either literals
(written in the config, never touched) or *one whole parameter value*
(``{"param": "path"}``, optionally ``{"param": "n", "prefix": "--lines="}``),
or a literal flag a ``bool`` parameter switches on (``{"flag": "-h", "when":
"human"}``).  There is no string templating at all: a value can never become
part of another word, let alone of the command name.  Parameters may instead
reach the command as environment variables (``"env": {"LINES": "n"}``).

Values are validated against their type before anything runs:

=========  ====================================================================
``path``   ASCII ``[A-Za-z0-9._/+@,:=-]``, absolute, no ``..`` or ``.``
           component, no ``//``; optionally under one of ``under`` (prefixes)
``string`` the template's regex (``pattern``), matched whole (``re.fullmatch``)
           with ``re.ASCII`` (``\\w`` is then ``[A-Za-z0-9_]``, not every
           script's letters); ``max_length``
``enum``   one of ``values``
``int``    a JSON integer (or its decimal text) within ``minimum``..``maximum``
``bool``   true/false (or their text)
=========  ====================================================================

and, for every type, the value may hold no control character (C0, DEL, C1:
newline, NUL, escape…) and no non-ASCII character (so Unicode look-alikes
such as a fullwidth ``；`` or a Cyrillic ``а`` cannot pass for what they
imitate) unless a ``string`` parameter says ``"unicode": true``; and a value
may not begin with ``-`` (it would be read as an option: ``--x``) unless the
parameter says ``"allow_leading_dash": true``.  Validation refuses; it never
"cleans" a value.

How a value reaches the target, honestly: SSH's exec request (RFC 4254 §6.5)
carries one *string*, which the target's sshd hands to the login shell as
``$SHELL -c STRING``.  There is no argv on the wire.  So the proxy builds the
string from argv with ``shlex.quote`` on every element (single quotes; a
quote inside becomes ``'"'"'``), which POSIX shells (sh, bash, dash, zsh,
ksh) turn back into exactly those argv elements.  A target whose login
shell is not POSIX (fish, csh, a restricted shell) would parse it otherwise:
such targets are not supported.  Validation above is the first line; the
quoting the second: a ``;``, ``|``, ``$(…)`` or backtick that a lax
``string`` pattern lets through still arrives as one literal argument.
Environment parameters are passed the same way, as ``env NAME=VALUE``
arguments (SSH's own "env" request is ignored by sshd unless its
``AcceptEnv`` lists the name).  The line starts with ``exec``, so the shell
replaces itself with the command: a signal the proxy sends on timeout or
cancel reaches the command itself.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from typing import Any

import attrs

PARAM_TYPES = ("path", "string", "enum", "int", "bool")
TEMPLATE_KEYS = {"description", "argv", "env", "params", "timeout_seconds", "output_limit_bytes", "targets",
                 "scopes", "login"}
PARAM_KEYS = {
    "path": {"under"},
    "string": {"pattern", "max_length", "unicode"},
    "enum": {"values"},
    "int": {"minimum", "maximum"},
    "bool": set(),
}
COMMON_PARAM_KEYS = {"type", "description", "required", "default", "allow_leading_dash"}
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 24 * 3600.0
DEFAULT_OUTPUT_LIMIT = 1024 * 1024
MAX_OUTPUT_LIMIT = 64 * 1024 * 1024
DEFAULT_MAX_LENGTH = 4096
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
PATH_RE = re.compile(r"[A-Za-z0-9._/+@,:=-]+")
# C0 controls, DEL and C1 controls: newline, NUL, ESC, CR… never in a value.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Environment names a template may not set: they change what the command (or its loader) runs.
FORBIDDEN_ENV = {"PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "BASH_ENV", "ENV", "IFS", "SHELL", "HOME",
                 "PS4", "SHELLOPTS", "BASHOPTS", "PYTHONPATH", "PERL5LIB", "PERL5OPT"}


class ParamError(ValueError):
    """A parameter value (or the set of them) is refused; ``param`` names it (None: the request)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@attrs.frozen
class Param:
    name: str
    type: str
    required: bool = False
    default: Any = None
    description: str = ""
    allow_leading_dash: bool = False
    under: tuple[str, ...] = ()
    pattern: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    unicode: bool = False
    values: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    def check(self, value: Any) -> Any:
        """The validated value (``int``/``bool`` typed, others ``str``) or ``ParamError``."""
        name = self.name
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value in ("true", "false"):
                return value == "true"
            raise ParamError(name, f"parameter {name!r}: expected true or false")
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ParamError(name, f"parameter {name!r}: expected an integer")
            if isinstance(value, str):
                if not re.fullmatch(r"-?[0-9]{1,18}", value):
                    raise ParamError(name, f"parameter {name!r}: expected an integer, got {_show(value)}")
                value = int(value)
            if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
                raise ParamError(name, f"parameter {name!r}: expected an integer in {_range(self)}, got {value}")
            return value
        if not isinstance(value, str):
            raise ParamError(name, f"parameter {name!r}: expected a string")
        if value == "":
            raise ParamError(name, f"parameter {name!r}: expected a non-empty value")
        if CONTROL_RE.search(value):
            raise ParamError(name, f"parameter {name!r}: control characters (newline, NUL, escape…) are not allowed")
        if not (self.type == "string" and self.unicode) and not value.isascii():
            raise ParamError(name, f"parameter {name!r}: only ASCII characters are allowed (got {_show(value)})")
        if value.startswith("-") and not self.allow_leading_dash:
            raise ParamError(name, f"parameter {name!r}: a value may not begin with '-' (it would be read as an option)")
        if len(value) > self.max_length:
            raise ParamError(name, f"parameter {name!r}: at most {self.max_length} characters")
        if self.type == "enum":
            if value not in self.values:
                raise ParamError(name, f"parameter {name!r}: expected one of {', '.join(self.values)}, got {_show(value)}")
            return value
        if self.type == "string":
            assert self.pattern is not None
            if re.fullmatch(self.pattern, value, re.ASCII) is None:
                raise ParamError(name, f"parameter {name!r}: does not match the pattern {self.pattern!r}")
            return value
        # path
        if not PATH_RE.fullmatch(value):
            raise ParamError(name, f"parameter {name!r}: a path of letters, digits and ._/+@,:=- only, got {_show(value)}")
        if not value.startswith("/"):
            raise ParamError(name, f"parameter {name!r}: an absolute path (starting with '/')")
        parts = value.split("/")[1:]
        if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", "..") or "//" in value:
            raise ParamError(name, f"parameter {name!r}: a normalised path (no '.', '..' or '//' components)")
        if self.under and not any(value == u or value.startswith(u.rstrip("/") + "/") for u in self.under):
            raise ParamError(name, f"parameter {name!r}: a path under {', '.join(self.under)}")
        return value

    def schema(self) -> dict:
        """This parameter as a JSON Schema (for ``GET /commands`` and the OpenAPI document)."""
        s: dict = {"description": self.description} if self.description else {}
        if self.type == "bool":
            s["type"] = "boolean"
        elif self.type == "int":
            s["type"] = "integer"
            if self.minimum is not None:
                s["minimum"] = self.minimum
            if self.maximum is not None:
                s["maximum"] = self.maximum
        else:
            s["type"] = "string"
            if self.type == "enum":
                s["enum"] = list(self.values)
            elif self.type == "string":
                s["pattern"] = f"^(?:{self.pattern})$"
                s["maxLength"] = self.max_length
            else:
                s["format"] = "path"
                if self.under:
                    s["x-under"] = list(self.under)
        if self.default is not None:
            s["default"] = self.default
        return s


def _range(p: Param) -> str:
    lo = "-∞" if p.minimum is None else str(p.minimum)
    hi = "∞" if p.maximum is None else str(p.maximum)
    return f"[{lo}, {hi}]"


def _show(value: str) -> str:
    # Refused values are echoed escaped and short: an error message must not carry a terminal escape.
    text = value if len(value) <= 64 else value[:64] + "…"
    return ascii(text)


@attrs.frozen
class Template:
    name: str
    argv: tuple  # str | ("param", name, prefix) | ("flag", text, param)
    params: dict  # name → Param (insertion order kept)
    env: tuple[tuple[str, str], ...] = ()  # (NAME, param)
    description: str = ""
    timeout: float = DEFAULT_TIMEOUT
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    targets: tuple[str, ...] = ("*",)
    scopes: tuple[str, ...] = ()
    login: str | None = None

    def allows_target(self, target: str) -> bool:
        return any(fnmatch.fnmatchcase(target, g) for g in self.targets)

    def validate(self, raw: Any) -> dict:
        """The request's parameters, validated, defaults applied; ``ParamError`` on the first problem."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ParamError(None, "\"params\" must be an object of parameter name → value")
        unknown = sorted(k for k in raw if k not in self.params)
        if unknown:
            raise ParamError(unknown[0], f"template {self.name!r} has no parameter {unknown[0]!r} "
                                         f"(it has: {', '.join(self.params) or 'none'})")
        out: dict = {}
        for name, p in self.params.items():
            if name in raw and raw[name] is not None:
                out[name] = p.check(raw[name])
            elif p.default is not None:
                out[name] = p.default
            elif p.required:
                raise ParamError(name, f"parameter {name!r} is required")
        return out

    def argv_for(self, values: dict) -> list[str]:
        """The argv elements for validated ``values`` (a missing optional parameter adds nothing)."""
        out: list[str] = []
        for item in self.argv:
            if isinstance(item, str):
                out.append(item)
            elif item[0] == "param":
                _, name, prefix = item
                if name in values:
                    out.append(prefix + _text(values[name]))
            else:
                _, flag, name = item
                if values.get(name) is True:
                    out.append(flag)
        return out

    def env_for(self, values: dict) -> list[tuple[str, str]]:
        return [(var, _text(values[name])) for var, name in self.env if name in values]

    def command_line(self, values: dict) -> str:
        """What the target's shell is asked to run: ``exec [env NAME=VALUE…] ARGV…``, each element shell-quoted."""
        env = self.env_for(values)
        words = ["exec"]
        if env:
            words += ["env", *(shlex.quote(f"{k}={v}") for k, v in env)]
        words += [shlex.quote(a) for a in self.argv_for(values)]
        return " ".join(words)

    def describe(self) -> dict:
        """What ``GET /commands`` shows of the template (no credential, the argv as configured)."""
        required = [n for n, p in self.params.items() if p.required and p.default is None]
        return {
            "name": self.name,
            "description": self.description,
            "argv": [a if isinstance(a, str) else {"param": a[1], **({"prefix": a[2]} if a[2] else {})}
                     if a[0] == "param" else {"flag": a[1], "when": a[2]} for a in self.argv],
            "env": {k: p for k, p in self.env},
            "params": {"type": "object", "additionalProperties": False, "required": required,
                       "properties": {n: p.schema() for n, p in self.params.items()}},
            "targets": list(self.targets),
            "scopes": list(self.scopes),
            "timeout_seconds": self.timeout,
            "output_limit_bytes": self.output_limit,
        }


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- config


def validate_templates(v: Any, raw: Any, path: str) -> dict[str, Template]:
    """``templates``: an object of template name → template; every problem recorded on ``v``."""
    d = v.obj(raw, path, "an object of template name → template")
    out: dict[str, Template] = {}
    for name, item in (d or {}).items():
        tp = f"{path}.{name}"
        if not NAME_RE.fullmatch(name):
            v.err(tp, "a template name of letters, digits, '.', '_' and '-' (at most 64, not starting with a symbol)")
            continue
        t = _template(v, name, item, tp)
        if t is not None:
            out[name] = t
    return out


def _template(v: Any, name: str, item: Any, tp: str) -> Template | None:
    td = v.section(item, tp, TEMPLATE_KEYS)
    if td is None:
        return None
    errors = len(v.errors)
    params: dict[str, Param] = {}
    praw = td.get("params", {})
    pd = v.obj(praw, f"{tp}.params", "an object of parameter name → parameter")
    for pname, pitem in (pd or {}).items():
        pp = f"{tp}.params.{pname}"
        if not PARAM_NAME_RE.fullmatch(pname):
            v.err(pp, "a parameter name of letters, digits and '_' (not starting with a digit)")
            continue
        p = _param(v, pname, pitem, pp)
        if p is not None:
            params[pname] = p
    used: set[str] = set()
    argv: list = []
    raw_argv = td.get("argv")
    if not isinstance(raw_argv, list) or not raw_argv:
        v.err(f"{tp}.argv" if "argv" in td else tp, "a key \"argv\": a non-empty array (the command and its arguments)")
    else:
        for i, a in enumerate(raw_argv):
            ap = f"{tp}.argv[{i}]"
            if isinstance(a, str):
                if not a or CONTROL_RE.search(a):
                    v.err(ap, "a non-empty literal without control characters")
                    continue
                argv.append(a)
            elif isinstance(a, dict) and "param" in a:
                v.unknown_keys(a, {"param", "prefix"}, ap)
                pname, prefix = a.get("param"), a.get("prefix", "")
                if not isinstance(prefix, str) or CONTROL_RE.search(prefix):
                    v.err(f"{ap}.prefix", "a literal string without control characters")
                    continue
                if pname not in params:
                    v.err(f"{ap}.param", f"the name of a parameter of this template, got {pname!r}")
                    continue
                if i == 0:
                    v.err(ap, "a literal command name (a parameter may not choose the program)")
                    continue
                if params[pname].type == "bool":
                    v.err(ap, f"a non-bool parameter (a bool parameter switches a flag: {{\"flag\": …, \"when\": {pname!r}}})")
                    continue
                used.add(pname)
                argv.append(("param", pname, prefix))
            elif isinstance(a, dict) and "flag" in a:
                v.unknown_keys(a, {"flag", "when"}, ap)
                flag, when = a.get("flag"), a.get("when")
                if not isinstance(flag, str) or not flag or CONTROL_RE.search(flag):
                    v.err(f"{ap}.flag", "a non-empty literal flag")
                    continue
                if when not in params or params[when].type != "bool":
                    v.err(f"{ap}.when", f"the name of a bool parameter of this template, got {when!r}")
                    continue
                used.add(when)
                argv.append(("flag", flag, when))
            else:
                v.err(ap, "a literal string, {\"param\": NAME[, \"prefix\": TEXT]} or {\"flag\": TEXT, \"when\": BOOL_PARAM}")
    env: list[tuple[str, str]] = []
    if "env" in td:
        ed = v.obj(td["env"], f"{tp}.env", "an object of environment variable name → parameter name")
        for var, pname in (ed or {}).items():
            ep = f"{tp}.env.{var}"
            if not ENV_NAME_RE.fullmatch(var) or var in FORBIDDEN_ENV or var.startswith(("LD_", "BASH_FUNC")):
                v.err(ep, "an upper-case variable name ([A-Z_][A-Z0-9_]*) that does not change what runs "
                          "(not PATH, LD_*, BASH_ENV, IFS…)")
            elif pname not in params:
                v.err(ep, f"the name of a parameter of this template, got {pname!r}")
            else:
                used.add(pname)
                env.append((var, pname))
    for pname in params:
        if pname not in used:
            v.err(f"{tp}.params.{pname}", "a parameter the template uses (in \"argv\" or \"env\")")
    timeout = v.number(td, "timeout_seconds", tp, minimum=0.1)
    if timeout is not None and timeout > MAX_TIMEOUT:
        v.err(f"{tp}.timeout_seconds", f"at most {MAX_TIMEOUT:g} seconds, got {timeout:g}")
    limit = v.integer(td, "output_limit_bytes", tp, minimum=1)
    if limit is not None and limit > MAX_OUTPUT_LIMIT:
        v.err(f"{tp}.output_limit_bytes", f"at most {MAX_OUTPUT_LIMIT} bytes, got {limit}")
    targets = _strings(v, td, "targets", tp, required=True, what="target globs")
    scopes = _strings(v, td, "scopes", tp, required=True, what="scope names the caller's roles must all carry")
    login = v.string(td, "login", tp, required=False)
    description = td.get("description", "")
    if not isinstance(description, str):
        v.err(f"{tp}.description", "a string")
        description = ""
    if len(v.errors) > errors:
        return None
    return Template(name=name, argv=tuple(argv), params=params, env=tuple(env), description=description,
                    timeout=timeout or DEFAULT_TIMEOUT, output_limit=limit or DEFAULT_OUTPUT_LIMIT,
                    targets=targets, scopes=scopes, login=login)


def _strings(v: Any, d: dict, key: str, path: str, *, required: bool, what: str) -> tuple[str, ...]:
    if key not in d:
        if required:
            v.err(path, f"a key {key!r}: a non-empty array of {what}")
        return ()
    value = d[key]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        v.err(f"{path}.{key}", f"a non-empty array of {what} (non-empty strings)")
        return ()
    return tuple(value)


def _param(v: Any, name: str, item: Any, pp: str) -> Param | None:
    d = v.obj(item, pp)
    if d is None:
        return None
    ptype = v.string(d, "type", pp, choices=PARAM_TYPES)
    if ptype is None:
        return None
    errors = len(v.errors)
    v.unknown_keys(d, COMMON_PARAM_KEYS | PARAM_KEYS[ptype], pp)
    fields: dict = {"name": name, "type": ptype, "required": v.boolean(d, "required", pp),
                    "allow_leading_dash": v.boolean(d, "allow_leading_dash", pp)}
    if isinstance(d.get("description", ""), str):
        fields["description"] = d.get("description", "")
    else:
        v.err(f"{pp}.description", "a string")
    if ptype == "path" and "under" in d:
        under = _strings(v, d, "under", pp, required=True, what="absolute path prefixes")
        for i, u in enumerate(under):
            if not u.startswith("/") or not PATH_RE.fullmatch(u) or "/../" in u + "/" or "/./" in u + "/":
                v.err(f"{pp}.under[{i}]", f"an absolute, normalised path, got {u!r}")
        fields["under"] = under
    if ptype == "string":
        pattern = v.string(d, "pattern", pp)
        if pattern is not None:
            try:
                re.compile(pattern, re.ASCII)
            except re.error as exc:
                v.err(f"{pp}.pattern", f"a Python regular expression ({exc})")
            fields["pattern"] = pattern
        ml = v.integer(d, "max_length", pp, minimum=1)
        if ml is not None:
            fields["max_length"] = ml
        fields["unicode"] = v.boolean(d, "unicode", pp)
    if ptype == "enum":
        values = d.get("values")
        if not isinstance(values, list) or not values or not all(isinstance(x, str) and x for x in values):
            v.err(f"{pp}.values" if "values" in d else pp, "a key \"values\": a non-empty array of strings")
        else:
            fields["values"] = tuple(values)
    if ptype == "int":
        for key in ("minimum", "maximum"):
            if key in d:
                x = d[key]
                if not isinstance(x, int) or isinstance(x, bool):
                    v.err(f"{pp}.{key}", f"an integer, got {x!r}")
                else:
                    fields[key] = x
        if fields.get("minimum") is not None and fields.get("maximum") is not None and fields["minimum"] > fields["maximum"]:
            v.err(pp, "\"minimum\" <= \"maximum\"")
    if len(v.errors) > errors:
        return None
    p = Param(**fields)
    if "default" in d:
        try:
            p = attrs.evolve(p, default=p.check(d["default"]))
        except ParamError as exc:
            v.err(f"{pp}.default", f"a valid value of the parameter ({exc})")
            return None
    return p
