"""Cassandra CQL native protocol (v3, v4, v5, v6-beta) for dbproxy.

``frames``   frame header, opcodes, lazy body parsers, encoders
``segments`` v5+ CRC-protected segment framing (uncompressed and LZ4)
``codec``    the sans-IO ``CqlDecoder`` with switchable framing, and encoders

Nothing is registered on import; the engine registers itself explicitly.
"""
