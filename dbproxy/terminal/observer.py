"""What the person at a terminal did, observed from the terminal stream with a VT100 emulator (pyte).

Strategy.  The engine feeds the target's output (:meth:`ShellObserver.output`)
and the client's keystrokes (:meth:`ShellObserver.input`); the observer keeps
a pyte screen of what the client sees and a small model of the line being
typed, and when Enter is pressed decides, *before the Enter is forwarded*:

- the command line as the screen shows it — from where the cursor stood at
  the line's first keystroke (the end of the prompt) to the end of the
  cursor's row (wrapped rows joined).  Editing, history and completion are
  whatever the shell drew, so the screen is the truth; when the screen
  lags behind what was typed (echo not back yet) the typed text is used
  (``source: "typed"``).  A line typed ahead before any prompt came back
  (a paste of several lines) has no screen position: its typed text is used
  when the screen shows it echoed;
- whether the terminal echoed it.  The proxy cannot read the target pty's
  termios, so echo is read off the screen: if the typed characters made
  nothing appear (a ``sudo`` / ``read -s`` / ``passwd`` prompt turns echo
  off), or the text before the cursor is a password-style prompt, the line
  is *hidden*: its text goes nowhere (not audited, not recorded; only its
  length is reported);
- the line policy's verdict (``check``, see ``linepolicy.py``) on the
  observed and typed text: a refused line is not submitted — Ctrl-C goes to
  the target instead of the Enter (the shell discards the line and draws a
  new prompt), the rest of a multi-line paste is dropped, and the client
  is told why.

Echo takes a round trip: when Enter arrives while keystrokes sent before it
have had no output back yet, the observer *waits* (``waiting``): the Enter
and anything after it stay queued until output arrives (the engine calls
:meth:`resume`) or ``echo_wait`` seconds pass (the engine's timer calls
``resume(timed_out=True)``: the line did not echo).  Only the Enter waits;
every other keystroke is forwarded at once.

Output is not fed to pyte as it arrives (100 MB of ``cat`` output would cost
seconds of emulation): it is kept in a bounded tail buffer (``tail`` bytes,
cut at a newline) and fed when a keystroke needs the screen; the screen at a
prompt depends on the last screenful, not on megabytes before it.

Full-screen programs (the alternate screen is on: ``vi``, ``less``, ``top``)
are not line-oriented: their keystrokes are forwarded and recorded as they
come, no command is observed, no line policy applies.

Exit status of a shell command is not knowable from the terminal stream (the
shell prints none; the proxy does not alter the user's shell to report it):
commands are audited with their output size instead, and the shell's own
exit status is the channel's.  No trio, no I/O.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import attrs
import pyte

# A prompt that asks for a secret: what is typed after it is hidden even if the terminal echoed it.
SECRET_PROMPT = re.compile(r"(?i)(password|passphrase|passcode|\bpin\b|secret|token|verification code)[^:\n]*:\s*$")

# pyte keeps private modes shifted by 5 bits (pyte.screens.Screen.set_mode).
_ALT_SCREEN_MODES = frozenset(m << 5 for m in (47, 1047, 1049))

ENTER = (0x0D, 0x0A)
CTRL_C = b"\x03"


class _Screen(pyte.Screen):
    """A pyte screen that counts scrolls, so a line's start row can be followed when it wraps at the bottom."""

    scrolled = 0

    def index(self) -> None:
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        if self.cursor.y == bottom:
            self.scrolled += 1
        super().index()


@attrs.define
class Line:
    """A line submitted with Enter (or refused at it)."""

    seq: int
    text: str | None  # None when hidden (not echoed)
    source: str  # "screen" | "typed"
    echoed: bool
    typed_bytes: int
    denied: tuple[str, str] | None = None  # (refused piece, pattern)
    output_start: int = 0  # the observer's output byte count at the Enter


@attrs.define
class Step:
    """What the engine does with a batch of keystrokes."""

    forward: bytearray = attrs.field(factory=bytearray)  # to the target, in order
    to_client: bytearray = attrs.field(factory=bytearray)  # the proxy's own words to the terminal
    record: bytearray = attrs.field(factory=bytearray)  # echoed input, for the input recording
    lines: list[Line] = attrs.field(factory=list)
    finished: list[tuple[Line, int]] = attrs.field(factory=list)  # (command, output bytes) now complete
    dropped: int = 0  # bytes of a paste not sent after a refused line


class ShellObserver:
    def __init__(self, width: int, height: int, *, check: Callable[[str], tuple[str, str] | None] | None = None,
                 tail: int = 64 * 1024, echo_wait: float = 0.3, clock: Callable[[], float] = time.monotonic) -> None:
        self.screen = _Screen(max(width, 1) or 80, max(height, 1) or 24)
        self.stream = pyte.ByteStream(self.screen)
        self.check = check
        self.tail = tail
        self.echo_wait = echo_wait
        self.clock = clock
        self.output_bytes = 0
        self._pending = bytearray()
        self._queue = bytearray()
        self.waiting = False
        self.wait_started = 0.0
        self.seq = 0
        self._open: Line | None = None  # the last submitted command, its output still counting
        self._reset_line()
        self._output_since_enter = True  # the banner and first prompt

    # -- the target's side ---------------------------------------------------------------
    def output(self, data: bytes) -> None:
        self.output_bytes += len(data)
        self._pending += data
        if len(self._pending) > 2 * self.tail:
            del self._pending[: len(self._pending) - self.tail]
            cut = self._pending.find(b"\n")
            if 0 <= cut < len(self._pending) - 1:
                del self._pending[: cut + 1]
        self._output_since_enter = True
        self._output_after_key = True

    def resize(self, width: int, height: int) -> None:
        self._flush()
        self.screen.resize(max(height, 1), max(width, 1))

    def _flush(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self.stream.feed(data)

    @property
    def alternate_screen(self) -> bool:
        self._flush()
        return bool(self.screen.mode & _ALT_SCREEN_MODES)

    def screen_text(self) -> list[str]:
        self._flush()
        return [row.rstrip() for row in self.screen.display]

    # -- the client's side ---------------------------------------------------------------
    def input(self, data: bytes) -> Step:
        self._queue += data
        return self._run(timed_out=False)

    def resume(self, *, timed_out: bool = False) -> Step:
        """Go on after output arrived (or, ``timed_out``, after ``echo_wait`` without the echo)."""
        return self._run(timed_out=timed_out)

    def close(self) -> Step:
        """The channel ended: the last command's output is complete; a line never submitted is dropped."""
        step = Step()
        self._finish(step)
        self._queue.clear()
        self._reset_line()
        return step

    def _reset_line(self) -> None:
        self._typed = bytearray()
        self._raw = bytearray()
        self._edited = False
        self._start: tuple[int, int, int] | None = None  # (row, col, scroll count) at the first keystroke
        self._started = False
        self._line_output_start = self.output_bytes
        self._output_since_enter = False
        self._output_after_key = True

    def _begin_line(self) -> None:
        self._started = True
        self._line_output_start = self.output_bytes  # the previous command's output ends here
        if self._output_since_enter:
            self._flush()
            c = self.screen.cursor
            self._start = (c.y, c.x, self.screen.scrolled)

    def _run(self, *, timed_out: bool) -> Step:
        step = Step()
        q = self._queue
        if not q:
            self.waiting = False
            return step
        if self.alternate_screen and not self._started:
            # A full-screen program: keys as they come (recorded: such programs echo by drawing).
            step.forward += q
            step.record += q
            q.clear()
            self.waiting = False
            return step
        i = 0
        n = len(q)
        sent = 0  # q[sent:i] are keystrokes not yet moved to step.forward
        while i < n:
            b = q[i]
            if b in ENTER:
                step.forward += q[sent:i]
                sent = i
                if self._started and not self._echo_settled() and not timed_out:
                    if not self.waiting:
                        self.waiting = True
                        self.wait_started = self.clock()
                    del q[:sent]
                    return step
                timed_out = False  # a timeout settles one line only
                self.waiting = False
                refused = self._submit(step, q[i:i + 1])
                i += 1
                sent = i
                if refused:
                    step.dropped = n - i
                    q.clear()
                    return step
                continue
            if not self._started:
                self._begin_line()
            self._raw.append(b)
            if b == 0x1B:  # an escape sequence (arrows, keypad, bracketed-paste marks): forwarded as is
                j = i + 1
                if j < n and q[j] in (0x5B, 0x4F):  # CSI / SS3
                    j += 1
                    while j < n and not 0x40 <= q[j] <= 0x7E:
                        j += 1
                    j += 1
                else:
                    j += 1
                seq = bytes(q[i:min(j, n)])
                if seq not in (b"\x1b[200~", b"\x1b[201~"):
                    self._edited = True
                self._raw += q[i + 1:min(j, n)]
                i = min(j, n)
                self._output_after_key = False
                continue
            if b in (0x7F, 0x08):
                while self._typed and 0x80 <= self._typed[-1] <= 0xBF:
                    self._typed.pop()
                if self._typed:
                    self._typed.pop()
            elif b == 0x15:  # kill line: the line is gone, the prompt stays where it was
                self._typed.clear()
                self._edited = False
            elif b == 0x03:
                # Interrupt: the shell (or the program running) draws "^C" and a new prompt below, so
                # the next line starts wherever the cursor is at its first key, not here.
                self._reset_line()
                self._output_after_key = False
                i += 1
                continue
            elif b < 0x20:
                self._edited = True  # Tab completion, Ctrl-W, Ctrl-R…: only the screen knows
            else:
                self._typed.append(b)
            self._output_after_key = False
            i += 1
        step.forward += q[sent:]
        q.clear()
        self.waiting = False
        return step

    # -- deciding a line ---------------------------------------------------------------------
    def _typed_text(self) -> str:
        return self._typed.decode("utf-8", "replace")

    def _observed(self) -> tuple[str | None, str]:
        """(the line as the screen shows it or None when its start is unknown, the text before it on its row)."""
        self._flush()
        rows = self.screen.display
        cur = self.screen.cursor
        if self._start is None:
            return None, rows[cur.y].rstrip()
        row, col, scrolled = self._start
        row -= self.screen.scrolled - scrolled
        if row < 0 or row > cur.y:
            return None, rows[cur.y].rstrip()
        text = rows[row][col:] + "".join(rows[r] for r in range(row + 1, cur.y + 1))
        return text.strip(), rows[row][:col]

    def _echo_settled(self) -> bool:
        if not self._typed and not self._edited:
            return True
        if not self._output_after_key:
            return False
        if self._edited:
            return True
        observed, row = self._observed()
        typed = self._typed_text().strip()
        if observed is None:
            return row.endswith(typed)
        if observed.endswith(typed):
            return True
        # An echo that differs from the keys (a program masking them) counts once it is as long as them,
        # but only on the prompt's own row: keys typed before the prompt was drawn (the line started at
        # column 0 of a fresh row) are followed by the previous command's last output and the prompt,
        # not by their echo, and must wait for it.
        row0, col0, scrolled = self._start  # known: observed is None without it
        same_row = row0 - (self.screen.scrolled - scrolled) == self.screen.cursor.y
        return same_row and col0 > 0 and len(observed) >= len(typed)

    def _submit(self, step: Step, enter: bytes) -> bool:
        """Decide the line ended by ``enter``; True when refused."""
        if not self._started:
            step.forward += enter
            step.record += enter
            self._reset_line()
            return False
        typed = self._typed_text().strip()
        observed, before = self._observed()
        if observed is None:
            if self._edited:
                echoed = self._output_after_key and not SECRET_PROMPT.search(before)
                text, source = (None, "typed") if not echoed else (before.strip() or None, "screen")
                # an edited line typed ahead: the row as drawn is the best the screen gives
            else:
                echoed = bool(typed) and before.endswith(typed) and not SECRET_PROMPT.search(before[: -len(typed)])
                text, source = typed, "typed"
        else:
            echoed = bool(observed) and not SECRET_PROMPT.search(before)
            text, source = observed, "screen"
            if not self._edited and typed.startswith(observed) and len(typed) > len(observed):
                text, source = typed, "typed"
            elif not self._edited and typed and observed.endswith(typed) and len(observed) > len(typed):
                # Typed before the prompt was drawn (its first key landed at the start of an empty row,
                # the prompt came after it): keys without editing are drawn as typed, so what the row
                # holds before them is the target's, not the command's.
                text = typed
        denied = None
        if self.check is not None:
            candidates = [t for t in (text if echoed else None, typed if not self._edited else None) if t]
            for candidate in dict.fromkeys(candidates):
                denied = self.check(candidate)
                if denied is not None:
                    break
        self.seq += 1
        line = Line(self.seq, text if echoed else None, source, echoed, len(self._raw), denied, self.output_bytes)
        step.lines.append(line)
        if denied is not None:
            step.forward += CTRL_C
            piece, pattern = denied
            what = repr(piece) if echoed else "the line"
            step.to_client += (f"\r\n\x1b[1mdbproxy: command refused by policy: {what} matches the deny pattern "
                               f"{pattern!r}; not sent\x1b[0m\r\n").encode()
        else:
            step.forward += enter
            if echoed:
                # A hidden line (a password for the running command) does not end that command's output.
                self._finish(step, self._line_output_start)
                self._open = line
                step.record += self._raw + enter
        self._reset_line()
        return denied is not None

    def _finish(self, step: Step, until: int | None = None) -> None:
        if self._open is not None:
            end = self.output_bytes if until is None else until
            step.finished.append((self._open, end - self._open.output_start))
            self._open = None
