"""``dbproxy audit verify FILE...`` and ``dbproxy audit tail FILE [--follow] [--user U] [--session SID]``.

``verify`` checks the hash chain of one JSONL trail (its rotated files may
be given too, in any order, ``.gz`` included) and prints the first break as
``FILE:LINE: reason``.  Exit status: 0 the chain holds, 1 it breaks, 2 a
file cannot be read.

``tail`` prints events one per line, human-readably; ``--follow`` keeps
printing new ones (across rotations) until interrupted.
"""

from __future__ import annotations

import argparse
import sys


def cmd_verify(args: argparse.Namespace) -> int:
    from audit.verify import verify_files

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
    print(f"OK: {result.events} events, seq {result.first_seq}-{result.last_seq}, chain intact{note}")
    print(f"  last hash {result.last_hash}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from audit.tail import follow, matcher, read_existing

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
    v = asub.add_parser("verify", help="verify the hash chain of a JSONL audit trail; report the first break")
    v.add_argument("files", nargs="+", metavar="FILE", help="the trail's files (rotated .gz ones too, any order)")
    v.set_defaults(func=cmd_verify)
    t = asub.add_parser("tail", help="print audit events human-readably")
    t.add_argument("file", metavar="FILE")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new events (survives rotation)")
    t.add_argument("--user", help="only events of this user (proxy identity or database user)")
    t.add_argument("--session", metavar="SID", help="only events of this session (a prefix of its id is enough)")
    t.add_argument("-n", "--lines", type=int, default=-1, metavar="N", help="only the last N matching events (default: all)")
    t.set_defaults(func=cmd_tail)
