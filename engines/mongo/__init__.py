"""MongoDB engine: wire protocol framing (``codec``), messages (``wire``) and SCRAM (``scram``).

Nothing is registered on import; the engine registry calls ``register_engine``
explicitly.
"""
