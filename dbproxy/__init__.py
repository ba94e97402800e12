"""dbproxy: a privileged-access proxy for database, terminal, desktop and BMC sessions."""

__version__ = "0.1.0"
