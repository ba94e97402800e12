"""The audit surface shared by every engine: events, the recorder, and sinks."""
