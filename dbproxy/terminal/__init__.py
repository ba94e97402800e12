"""Terminal sessions, engine-agnostic and sans-IO: asciicast recording, the pyte screen observer, line policy.

Shared by the terminal engines (SSH today, Telnet later): an engine feeds
the target's output and the client's keystrokes in, and gets back what to
forward, what to audit and what to record.  No trio, no asyncssh here.
"""
