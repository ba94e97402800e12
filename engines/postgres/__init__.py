"""PostgreSQL engine: v3 wire codec (``codec``, ``messages``) and client-side auth (``auth``)."""
