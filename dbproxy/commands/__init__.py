"""Command templates: an HTTP API that runs pre-approved, parameter-validated commands on targets.

``templates`` (config schema, parameter validation, the command line),
``jobs`` (runs, output, limits), ``api`` (the engine base class serving the
HTTP API; a protocol engine implements ``execute``), ``auditlog`` (``GET
/audit/logs``), ``openapi`` (the document and ``/docs``).  See
docs/commands.md.
"""
