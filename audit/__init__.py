"""The audit surface shared by every engine: events, the recorder, and sinks.

From Python: ``dbproxy.audit.read(path, **filters)`` iterates a JSONL trail's
events, ``dbproxy.audit.verify(path)`` checks its hash chain (``audit/reader.py``).
"""


def read(path, **filters):
    """The events of a JSONL audit trail that pass every filter (see ``dbproxy.audit.reader.read``)."""
    from .reader import read as _read

    return _read(path, **filters)


def verify(path):
    """Check a JSONL audit trail's hash chain (see ``dbproxy.audit.reader.verify``)."""
    from .reader import verify as _verify

    return _verify(path)
