"""Redfish: an HTTPS reverse proxy in front of BMCs (docs/redfish.md)."""
