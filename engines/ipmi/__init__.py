"""IPMI v2.0 / RMCP+ engine (see engine.py)."""
