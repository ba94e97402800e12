"""CQL's statement lexer: the words and names the Cassandra policy classifies.

Strategy.  A regex lexer that knows just enough of CQL's lexical structure
(Cassandra 5.0 ``Lexer.g``: ``--`` and ``//`` line comments, ``/* */``
comments, which do not nest; ``'…'`` strings with ``''``; ``$$…$$``
literals; ``"…"`` identifiers with ``""``; unquoted identifiers and
keywords ``LETTER (LETTER | DIGIT | '_')*``, ASCII letters only, so ``x$$``
is a name and a ``$$`` literal, as Cassandra reads it) to find statement
boundaries and keywords without being fooled by text inside literals.  Nothing is
executed or fully parsed; ``policy.classify`` reads the tokens.

Kept tokens: ``word`` (upper-cased), ``ident`` (quoted, as written),
``dot`` (a ``.`` between names, so ``ks.table`` is readable) and ``sep``
(anything else that is not blank — literals, numbers, punctuation — so that
tokens are adjacent only when nothing but blanks and comments stood
between them, as in the CQL grammar).  Literals and operators themselves
are never kept.

``BEGIN [UNLOGGED|COUNTER] BATCH … APPLY BATCH`` is one statement: the
``;`` between its children do not end it (grammar ``batchStatement``), so
the writes inside stay visible to the policy.
"""

from __future__ import annotations

import re

from dbproxy.statements import Statement, Token, head_command

SEP = Token("sep", "")
DOT = Token("dot", ".")

_VERBS = frozenset({"CREATE", "DROP", "ALTER"})
# CREATE OR REPLACE FUNCTION, CREATE CUSTOM INDEX; IF [NOT] EXISTS comes after the object.
_MODIFIERS = frozenset({"OR", "REPLACE", "CUSTOM"})
_COMPOUNDS = {"MATERIALIZED": frozenset({"VIEW"})}

# One match for a whole run of what the classifier never reads as a name: blanks, digits,
# operators, ``?``/``:name`` markers and complete string literals.  "." is a token of its own
# (keyspace.table) except before a digit (1.5, .5); "-" and "/" stay out (they may open a comment).
_REGEX = re.compile(
    r"""
      (?P<ws>(?:[\s0-9,+*=<>!%^|~#@?:\[\]{}&()]+|\$\d+|\.(?=[0-9])|'[^']*(?:''[^']*)*')+)
    | (?P<lcomment>--[^\n]*|//[^\n]*)
    | (?P<bcomment>/\*)
    | (?P<dollar>\$\$)
    | (?P<str>')
    | (?P<qident>")
    | (?P<word>[A-Za-z][A-Za-z0-9_]*)
    | (?P<semi>;)
    | (?P<op>.)
    """,
    re.X | re.S,
)
_STRING = re.compile(r"[^']*(?:''[^']*)*'", re.S)
_QIDENT = re.compile(r'[^"]*(?:""[^"]*)*"', re.S)


def _statement(tokens: list[Token]) -> Statement:
    words = [t.value for t in tokens if t.kind == "word"]
    return Statement(tuple(tokens), head_command(words, verbs=_VERBS, modifiers=_MODIFIERS, compounds=_COMPOUNDS))


def split_statements(text: str) -> list[Statement]:
    """Statements of ``text`` (split at ``;`` outside literals, comments and batches)."""
    out: list[Statement] = []
    cur: list[Token] = []
    words = 0  # words in ``cur`` so far
    batch = 0  # 0 no batch, 1 inside BEGIN … BATCH, 2 after APPLY inside it, 3 applied
    pos, n = 0, len(text)
    while pos < n:
        m = _REGEX.match(text, pos)
        assert m is not None  # (?P<op>.) matches anything
        kind = m.lastgroup
        end = m.end()
        if kind == "word":
            word = m.group().upper()
            if batch == 0:
                if word == "BATCH" and words in (1, 2) and cur[0].value == "BEGIN":
                    batch = 1
            elif batch == 1:
                if word == "APPLY":
                    batch = 2
            elif batch == 2:
                batch = 3 if word == "BATCH" else 1
            words += 1
            cur.append(Token("word", word))
        elif kind == "semi":
            if batch in (1, 2):
                cur.append(SEP)
            else:
                if cur:
                    out.append(_statement(cur))
                cur = []
                words = batch = 0
        elif kind == "bcomment":
            close = text.find("*/", end)
            end = n if close < 0 else close + 2
        elif kind == "str":
            body = _STRING.match(text, end)
            end = body.end() if body else n
            cur.append(SEP)
        elif kind == "qident":
            body = _QIDENT.match(text, end)
            end = body.end() if body else n
            cur.append(Token("ident", text[m.end(): end - 1].replace('""', '"') if body else text[m.end():]))
        elif kind == "dollar":
            close = text.find("$$", end)
            end = n if close < 0 else close + 2
            cur.append(SEP)
        elif kind == "op":
            cur.append(DOT if m.group() == "." else SEP)
        elif kind == "ws" and not m.group().isspace():
            cur.append(SEP)
        # otherwise blanks and comments: adjacency is all they affect
        pos = end
    if cur:
        out.append(_statement(cur))
    return out
