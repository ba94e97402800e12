"""The terminal observer (dbproxy.terminal.observer) on scripted terminal streams: what bash's readline would draw."""

from __future__ import annotations

from dbproxy.terminal.linepolicy import LinePolicy
from dbproxy.terminal.observer import ShellObserver


class Grant:
    def __init__(self, *patterns: str) -> None:
        self.deny_commands = patterns

    def denied_command(self, piece: str) -> str | None:
        first = piece.split()[0] if piece.split() else ""
        return next((p for p in self.deny_commands if p in (piece, first)), None)


def split(line: str) -> list[str]:
    return [p.strip() for p in line.replace("&&", ";").split(";") if p.strip()]


def shell(check=None, width: int = 80) -> ShellObserver:
    o = ShellObserver(width, 24, check=check)
    o.output(b"Linux target 6.1\r\nprompt$ ")
    return o


def type_line(o: ShellObserver, text: bytes, echo: bytes | None = None):
    """Keys, their echo, then Enter (waiting for nothing: the echo is back)."""
    s1 = o.input(text)
    o.output(text if echo is None else echo)
    s2 = o.input(b"\r")
    return s1, s2


def test_command_read_from_the_screen_after_editing():
    o = shell()
    # "ls -X", backspace, "l": readline draws "ls -" then "l" (after \b \x1b[K)
    o.input(b"ls -X")
    o.output(b"ls -X")
    o.input(b"\x7f")
    o.output(b"\x08\x1b[K")
    o.input(b"l")
    o.output(b"l")
    step = o.input(b"\r")
    (line,) = step.lines
    assert line.text == "ls -l" and line.source == "screen" and line.echoed
    assert bytes(step.forward) == b"\r"
    assert bytes(step.record) == b"ls -X\x7fl\r"


def test_history_recall_is_what_the_screen_shows():
    o = shell()
    type_line(o, b"echo one")
    o.output(b"\r\none\r\nprompt$ ")
    o.input(b"\x1b[A")  # up arrow: readline redraws the previous line
    o.output(b"echo one")
    (line,) = o.input(b"\r").lines
    assert line.text == "echo one" and line.source == "screen"


def test_enter_waits_for_the_echo_then_goes():
    o = shell()
    step = o.input(b"whoami\r")
    assert bytes(step.forward) == b"whoami" and not step.lines and o.waiting
    o.output(b"who")
    step = o.resume()
    assert o.waiting and not step.lines  # half the echo: still waiting
    o.output(b"ami")
    step = o.resume()
    assert not o.waiting and bytes(step.forward) == b"\r"
    assert step.lines[0].text == "whoami"


def test_no_echo_line_is_hidden_and_not_recorded():
    o = shell()
    type_line(o, b"read -s X")
    o.output(b"\r\nEnter it> ")
    step = o.input(b"hunter2\r")
    assert bytes(step.forward) == b"hunter2" and o.waiting
    step = o.resume(timed_out=True)  # nothing came back: the terminal did not echo
    (line,) = step.lines
    assert line.text is None and not line.echoed and line.typed_bytes == len(b"hunter2")
    assert bytes(step.forward) == b"\r" and bytes(step.record) == b""
    assert not step.finished  # the running command's output goes on


def test_password_prompt_hides_even_an_echoed_line():
    o = shell()
    o.output(b"\r\n[sudo] password for alice: ")
    s1, s2 = type_line(o, b"visible")
    assert s2.lines[0].text is None and bytes(s2.record) == b""


def test_denied_line_is_cancelled_and_the_client_told():
    o = shell(LinePolicy(Grant("rm"), split))
    o.input(b"rm -rf /tmp/x")
    o.output(b"rm -rf /tmp/x")
    step = o.input(b"\r")
    (line,) = step.lines
    assert line.denied == ("rm -rf /tmp/x", "rm")
    assert bytes(step.forward) == b"\x03"  # Ctrl-C instead of the Enter
    assert b"command refused by policy" in step.to_client and b"'rm'" in step.to_client


def test_paste_split_into_lines_and_the_rest_dropped_after_a_refusal():
    o = shell(LinePolicy(Grant("rm"), split))
    step = o.input(b"echo a\rrm x\recho c\r")
    assert bytes(step.forward) == b"echo a" and o.waiting
    o.output(b"echo a")
    step = o.resume()
    assert [ln.text for ln in step.lines] == ["echo a"] and bytes(step.forward).startswith(b"\r")
    # "rm x" was typed ahead of the prompt: checked as typed, once its echo is on the cursor row
    assert bytes(step.forward) == b"\rrm x" and o.waiting
    o.output(b"\r\na\r\nprompt$ rm x")
    step = o.resume()
    (line,) = step.lines
    assert line.denied is not None and line.source == "typed"
    assert bytes(step.forward) == b"\x03" and step.dropped == len(b"echo c\r")


def test_typed_text_checked_even_when_the_echo_differs():
    o = shell(LinePolicy(Grant("rm"), split))
    o.input(b"rm x")
    o.output(b"**** ")  # a program that masks what it echoes
    step = o.input(b"\r")
    assert step.lines[0].denied is not None


def test_alternate_screen_keys_pass_through_unobserved():
    o = shell(LinePolicy(Grant("rm"), split))
    type_line(o, b"vi f")
    o.output(b"\x1b[?1049h\x1b[H\x1b[2J~\r\n~")
    step = o.input(b"irm x\r")
    assert bytes(step.forward) == b"irm x\r" and not step.lines and bytes(step.record) == b"irm x\r"


def test_output_sizes_per_command():
    o = shell()
    type_line(o, b"seq 3")
    o.output(b"\r\n1\r\n2\r\n3\r\nprompt$ ")
    s1, s2 = type_line(o, b"true")
    ((line, size),) = s2.finished
    assert line.text == "seq 3" and size == len(b"\r\n1\r\n2\r\n3\r\nprompt$ ")
    assert [ln for ln, _ in o.close().finished][0].text == "true"


def test_output_buffer_is_bounded_and_the_screen_still_right():
    o = ShellObserver(80, 24, tail=4096)
    o.output(b"x" * 79 + b"\r\n")
    for _ in range(20000):
        o.output(b"0123456789" * 7 + b"\r\n")
    assert len(o._pending) <= 2 * 4096
    o.output(b"prompt$ ")
    type_line(o, b"ls")
    assert o.screen_text()[-1] == "prompt$ ls"


def test_wrapped_long_line_is_joined():
    o = shell(width=20)
    cmd = b"echo " + b"a" * 30
    s1, s2 = type_line(o, cmd)
    assert s2.lines[0].text == cmd.decode() and s2.lines[0].source == "screen"


def test_hidden_line_still_checked_as_typed_and_its_text_kept_out():
    """``stty -echo`` then a denied command: refused, and the event has no text (it might be a secret)."""
    o = shell(LinePolicy(Grant("rm"), split))
    step = o.input(b"rm -rf /srv\r")
    assert o.waiting
    step = o.resume(timed_out=True)
    (line,) = step.lines
    assert line.text is None and not line.echoed and line.denied == ("rm -rf /srv", "rm")
    assert bytes(step.forward) == b"\x03" and b"/srv" not in step.to_client


def test_ctrl_c_at_a_running_command_starts_the_next_line_after_the_new_prompt():
    """Ctrl-C while ``sleep`` runs: the shell draws ``^C`` and a new prompt; the next line is read from there."""
    o = shell()
    type_line(o, b"sleep 100")
    o.output(b"\r\n")
    step = o.input(b"\x03")
    assert bytes(step.forward) == b"\x03" and not step.lines
    o.output(b"^C\r\nprompt$ ")
    _, step = type_line(o, b"echo after")
    (line,) = step.lines
    assert line.text == "echo after" and line.source == "screen"


def test_line_typed_before_the_prompt_is_drawn_is_not_prefixed_with_it():
    """A paste lands while the previous command's output ended but its prompt is not drawn yet."""
    o = shell()
    type_line(o, b"echo one")
    o.output(b"\r\none\r\n")  # the prompt comes in a later chunk
    o.input(b"echo two")
    o.output(b"prompt$ echo two")
    (line,) = o.input(b"\r").lines
    assert line.text == "echo two" and line.echoed


def test_keys_typed_before_the_last_output_and_prompt_wait_for_their_echo():
    """``exit`` typed as soon as the first line of ``echo hi; whoami`` showed: the rest of the output and the
    prompt arrive before the echo of ``exit``; the Enter waits for it, and the command is ``exit``, not the
    output that happened to come first (seen in a CI run through the Telnet proxy)."""
    o = shell()
    type_line(o, b"echo hi-$((6*7)); whoami")
    o.output(b"\r\nhi-42\r\n")
    o.input(b"exit")
    o.output(b"dbptelnet\r\nprompt$ ")
    step = o.input(b"\r")
    assert o.waiting and not step.lines and bytes(step.forward) == b""
    o.output(b"exit")
    step = o.resume()
    (line,) = step.lines
    assert line.text == "exit" and line.echoed and bytes(step.forward) == b"\r"
