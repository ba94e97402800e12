"""IPMI v2.0 / RMCP+ engine (BMC family); Serial-over-LAN in ``sol``."""
