"""SSH: terminal sessions through the proxy (asyncssh on both sides, behind ``bridge``)."""
