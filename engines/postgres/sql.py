"""PostgreSQL's statement lexer: the SQL dialect the access rules check.

Strategy.  A regex lexer that knows just enough of PostgreSQL's lexical
structure (docs §4.1 "Lexical Structure") — ``--`` and nested ``/* */``
comments, quoted strings, ``E''``/``U&''``/``B''``/``X''``/``N''`` strings,
dollar quoting, quoted and ``U&"…"`` identifiers — to find statement
boundaries and keywords without being fooled by text inside literals.  It
never executes or fully parses anything.  Only keywords and identifiers are
kept: runs of literals, digits and punctuation are one regex match each, so
a 1.5 MB multi-row INSERT lexes in milliseconds.

``variants``: a client can switch ``standard_conforming_strings`` off in
the same pipeline (§4.1.2.2), and the two readings can disagree on where a
literal ends; text with a backslash is lexed both ways, so no reading hides
a statement from the policy.

``SQL`` is the ``dbproxy.statements.Dialect`` the Postgres policy hands to
``Grant.refusal``; its read-only rules are ``policy.read_only_violation``.
"""

from __future__ import annotations

import re

from dbproxy.statements import Statement, Token, head_command

_VERBS = frozenset({"CREATE", "DROP", "ALTER", "COMMENT", "SECURITY"})
_MODIFIERS = frozenset({"OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL", "UNIQUE", "TRUSTED", "PROCEDURAL", "RECURSIVE", "DEFAULT", "CONSTRAINT", "ON"})
# Objects named by two words (CREATE MATERIALIZED VIEW, FOREIGN DATA WRAPPER, USER MAPPING …);
# any other second word is a name (DROP USER alice is DROP USER).
_COMPOUNDS = {
    "MATERIALIZED": frozenset({"VIEW"}),
    "FOREIGN": frozenset({"TABLE", "DATA"}),
    "EVENT": frozenset({"TRIGGER"}),
    "TEXT": frozenset({"SEARCH"}),
    "ACCESS": frozenset({"METHOD"}),
    "USER": frozenset({"MAPPING"}),
}
_NESTING_HEADS = frozenset({"WITH", "EXPLAIN", "PREPARE", "DECLARE", "COPY", "CREATE"})
_NESTED_COMMANDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "DROP"})


def _token_regex(backslash_strings: bool) -> re.Pattern:
    # Unrolled-loop forms ('[^']*(?:''[^']*)*'): the engine scans runs, not one alternation per character.
    string = r"'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'" if backslash_strings else r"'[^']*(?:''[^']*)*'"
    # One match for a whole run of what the rules never read: whitespace, digits, operators,
    # parentheses, parameters and complete plain string literals (a multi-row VALUES list is
    # a handful of matches).  "-" and "/" stay out (they may open a comment); letters, "$",
    # '"' and ";" start the other tokens; an unterminated literal falls to (?P<str>).
    return re.compile(
        rf"""
          (?P<ws>(?:[\s0-9,.+*=<>!%^|~#@?:\[\]{{}}&()]+|\$\d+|{string})+)
        | (?P<lcomment>--[^\n]*)
        | (?P<bcomment>/\*)
        | (?P<estr>[eE]')
        | (?P<ustr>[uU]&')
        | (?P<uident>[uU]&")
        | (?P<pstr>[bBxXnN]')
        | (?P<dollar>\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9\u0080-\U0010ffff]*)?\$)
        | (?P<str>')
        | (?P<qident>")
        | (?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9$\u0080-\U0010ffff]*)
        | (?P<semi>;)
        | (?P<op>.)
        """,
        re.X | re.S,
    )


_REGEX = {False: _token_regex(False), True: _token_regex(True)}
_STD_STRING = re.compile(r"[^']*(?:''[^']*)*'", re.S)
_BACKSLASH_STRING = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.S)
_QIDENT = re.compile(r'[^"]*(?:""[^"]*)*"', re.S)
_COMMENT_EDGE = re.compile(r"/\*|\*/")


def _skip_nested_comment(text: str, pos: int) -> int:
    """``pos`` is just after ``/*``; return the position after the matching ``*/`` (or the end): they nest (§4.1.5)."""
    depth = 1
    for m in _COMMENT_EDGE.finditer(text, pos):
        depth += 1 if m.group() == "/*" else -1
        if depth == 0:
            return m.end()
    return len(text)


def _statement(tokens: list[Token]) -> Statement:
    words = [t.value for t in tokens if t.kind == "word"]
    command = head_command(words, verbs=_VERBS, modifiers=_MODIFIERS, compounds=_COMPOUNDS)
    nested: tuple[str, ...] = ()
    if command.split(" ", 1)[0] in _NESTING_HEADS:
        nested = tuple(dict.fromkeys(w for w in words[1:] if w in _NESTED_COMMANDS and w != command))
    return Statement(tuple(tokens), command, nested)


def split_statements(text: str, *, backslash_strings: bool = False) -> list[Statement]:
    """Statements of ``text`` (split at ``;`` outside literals/comments), each as its word tokens.

    ``backslash_strings``: lex plain ``'…'`` literals with backslash escapes
    (``standard_conforming_strings = off``).  Tokens: ``word``, ``ident``,
    ``uident`` (``U&"…"``, which could spell any name).
    """
    regex = _REGEX[backslash_strings]
    plain = _BACKSLASH_STRING if backslash_strings else _STD_STRING
    out: list[Statement] = []
    cur: list[Token] = []
    pos, n = 0, len(text)
    while pos < n:
        m = regex.match(text, pos)
        assert m is not None  # (?P<op>.) matches anything
        kind = m.lastgroup
        end = m.end()
        if kind == "word":
            cur.append(Token("word", m.group().upper()))
        elif kind == "semi":
            if cur:
                out.append(_statement(cur))
            cur = []
        elif kind == "bcomment":
            end = _skip_nested_comment(text, end)
        elif kind in ("str", "pstr", "ustr", "estr"):
            body = (_BACKSLASH_STRING if kind == "estr" else plain).match(text, end)
            end = body.end() if body else n
        elif kind in ("qident", "uident"):
            body = _QIDENT.match(text, end)
            end = body.end() if body else n
            value = text[m.end(): end - 1].replace('""', '"') if body else text[m.end():]
            cur.append(Token("ident" if kind == "qident" else "uident", value))
        elif kind == "dollar":
            close = text.find(m.group(), end)
            end = n if close < 0 else close + len(m.group())
        # otherwise ws, comments, operators: nothing the rules read
        pos = end
    if cur:
        out.append(_statement(cur))
    return out


def statement_variants(text: str) -> list[list[Statement]]:
    """How ``text`` may lex: with standard strings, and (if it has a backslash) with backslash escapes too."""
    variants = [split_statements(text)]
    if "\\" in text:
        variants.append(split_statements(text, backslash_strings=True))
    return variants
