"""``dbproxy audit verify FILE...`` and ``dbproxy audit tail FILE [--follow] [--user U] [--session SID]``.

``verify`` checks the hash chain of one JSONL trail (its rotated files may
be given too, in any order, ``.gz`` included) and prints the first break as
``FILE:LINE: reason``; with the chain intact, it reports gaps: sessions with
missing events (``session_seq``), sessions cut off without an end, unclean
restarts (see ``audit.chain``).  Exit status: 0 the chain holds and no
gaps, 1 it breaks, 2 a file cannot be read, 3 gaps.

``tail`` prints events one per line, human-readably; ``--follow`` keeps
printing new ones (across rotations) until interrupted.
"""

from __future__ import annotations

import argparse
import sys


def cmd_verify(args: argparse.Namespace) -> int:
    from dbproxy.audit.chain import verify_files

    result = verify_files(args.files)
    if result.error is not None:
        print(f"FAILED: {result.error}")
        if result.events:
            print(f"  {result.events} events verified before the break (seq {result.first_seq}-{result.last_seq})")
        return 2 if result.error.line == 0 else 1
    if not result.events:
        print("OK: no events")
        return 0
    note = "" if result.first_seq == 1 else f" (starts at seq {result.first_seq}: earlier events are in other files)"
    head = "OK" if not result.gaps else "GAPS"
    print(f"{head}: {result.events} events, seq {result.first_seq}-{result.last_seq}, chain intact{note}")
    print(f"  last hash {result.last_hash}")
    if result.sessions and not result.counted_sessions:
        print(f"  {result.sessions} sessions, no session counts (a trail written before session_seq): "
              "missing events cannot be told")
    elif result.sessions:
        line = f"  {result.sessions} sessions ({result.counted_sessions} counted)"
        if result.open_sessions:
            line += f", {result.open_sessions} without an end yet in the last run (may still be open)"
        print(line)
    if result.runs:
        print(f"  {result.runs} proxy runs (proxy.start markers)")
    if result.repeated:
        print(f"  {result.repeated} events written twice (an audit worker restart replayed input it had not acked)")
    if result.gaps:
        print(f"  {len(result.gaps)} gaps: events missing from the trail")
        for gap in result.gaps[:50]:
            print(f"  - {gap}")
        if len(result.gaps) > 50:
            print(f"  … and {len(result.gaps) - 50} more")
        return 3
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from dbproxy.audit.tail import follow, matcher, read_existing

    match = matcher(user=args.user, session=args.session)
    try:
        lines, offset = read_existing(args.file, match, None if args.lines < 0 else args.lines)
    except OSError as exc:
        print(f"error: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    sys.stdout.flush()
    if not args.follow:
        return 0
    if args.file.endswith(".gz"):
        print("error: --follow needs the live (uncompressed) file", file=sys.stderr)
        return 2

    def emit(line: str) -> None:
        print(line, flush=True)

    try:
        follow(args.file, offset, match, emit)
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="check and read JSONL audit trails")
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="verify the hash chain of a JSONL audit trail and report gaps (missing events, unclean restarts)")
    v.add_argument("files", nargs="+", metavar="FILE", help="the trail's files (rotated .gz ones too, any order)")
    v.set_defaults(func=cmd_verify)
    t = asub.add_parser("tail", help="print audit events human-readably")
    t.add_argument("file", metavar="FILE")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new events (survives rotation)")
    t.add_argument("--user", help="only events of this user (proxy identity or database user)")
    t.add_argument("--session", metavar="SID", help="only events of this session (a prefix of its id is enough)")
    t.add_argument("-n", "--lines", type=int, default=-1, metavar="N", help="only the last N matching events (default: all)")
    t.set_defaults(func=cmd_tail)
