"""The dialect interface: what the core's access rules need from a statement language.

Strategy.  The core enforces roles (``dbproxy.roles.Grant``: deny patterns,
read-only) without knowing any query language.  An engine whose protocol
carries statement text brings a *dialect* — its own lexer and its own idea
of what a statement's command is and what read-only forbids — and passes it
to ``Grant.refusal(text, dialect)``.  The lexers live with their engines
(``engines/postgres/sql.py``, ``engines/cassandra/cql.py``); this module
holds only the interface and the shapes both lexers fill in:

- ``Token`` / ``Statement``: a statement as the keywords and identifiers a
  lexer kept (literals, numbers and comments are never kept), with the
  command the dialect named (``"DROP TABLE"``) and the data-modifying
  commands nested in it (``WITH … DELETE``).
- ``head_command``: the mechanism "verb plus object, modifiers skipped"
  (``CREATE OR REPLACE VIEW`` → ``CREATE VIEW``); the words are the
  dialect's.
- ``Dialect``: ``statements(text)`` and ``variants(text)`` (every reading a
  policy must check: PostgreSQL lexes with and without backslash escapes),
  ``commands(stmt)`` (what deny patterns match, the statement's own command
  first) and ``read_only_violation(stmt)`` (why a read-only session may not
  run it, or None).  A dialect may return its own statement type (the CQL
  one carries keyspace references): the core only hands it back.

Nothing here parses or executes anything.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, Sequence, TypeVar

import attrs


@attrs.frozen
class Token:
    """A kept token: ``word`` (value upper-cased), ``ident`` (quoted, as written), or a kind the dialect defines."""

    kind: str
    value: str


@attrs.frozen
class Statement:
    """One statement as its kept tokens, with the command its dialect named."""

    tokens: tuple[Token, ...]
    command: str = ""  # "SELECT", "DROP TABLE", "ALTER SYSTEM" … ("" for an empty statement)
    nested: tuple[str, ...] = ()  # data-modifying commands inside it, in order, each once

    @property
    def words(self) -> list[str]:
        return [t.value for t in self.tokens if t.kind == "word"]

    def names(self) -> set[str]:
        """Every identifier and keyword, lower-cased (quoted ones too: GUC and function lookups ignore case)."""
        return {t.value.lower() for t in self.tokens if t.kind in ("word", "ident")}

    def commands(self) -> list[str]:
        """The command plus the commands nested in it."""
        return ([self.command] if self.command else []) + list(self.nested)


def head_command(words: Sequence[str], *, verbs: frozenset[str], modifiers: frozenset[str], compounds: Mapping[str, frozenset[str]]) -> str:
    """The command of a statement whose upper-cased words are ``words``.

    An object verb (``verbs``: CREATE, DROP …) takes its object, skipping
    ``modifiers`` (OR REPLACE, TEMP …) among the next few words; an object
    listed in ``compounds`` takes the second word only when it is one of the
    listed ones (MATERIALIZED VIEW, but USER alice stays USER).  Any other
    statement's command is its first word.
    """
    if not words:
        return ""
    head = words[0]
    if head in verbs:
        rest = [w for w in words[1:8] if w not in modifiers]
        if rest:
            obj = rest[0]
            if len(rest) > 1 and rest[1] in compounds.get(obj, ()):
                obj = f"{obj} {rest[1]}"
            return f"{head} {obj}"
    return head


S = TypeVar("S")


class Dialect(Protocol[S]):
    """A statement language, as an engine gives it to the core's access rules."""

    name: str

    def statements(self, text: str) -> list[S]:
        """The statements of ``text``, split where the language splits them."""
        ...

    def variants(self, text: str) -> list[list[S]]:
        """Every way ``text`` may lex; a policy checks them all, so no reading hides a statement."""
        ...

    def commands(self, stmt: S) -> Iterable[str]:
        """What deny patterns are matched against: the statement's command first, then nested ones."""
        ...

    def read_only_violation(self, stmt: S) -> str | None:
        """Why a read-only session may not run ``stmt``, or None."""
        ...


@attrs.frozen
class Refusal:
    """Why a grant refuses a statement; the engine words the message in its protocol's style."""

    reason: str  # "command_denied" or "read_only" (the audit event's reason)
    command: str  # the command refused ("DROP TABLE"; a nested one when that is what matched)
    detail: str  # command_denied: the role's pattern; read_only: the dialect's why
