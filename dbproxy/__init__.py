"""dbproxy: a privileged-access proxy for database, terminal, desktop and BMC sessions.

One import package.  The repository keeps three folders at its root --
``dbproxy/`` (the core), ``engines/`` and ``audit/`` -- and the wheel maps the
last two under this package as ``dbproxy.engines`` and ``dbproxy.audit``
(``pyproject.toml``'s ``package-dir``), so installing adds no other top-level
name.  A source checkout (tests, ``python -m dbproxy.cli`` from the repo
root, the audit worker started as ``python -m dbproxy.audit.worker``) has no
``dbproxy/engines`` folder: the finder below gives those two names the
checkout's folders, so the same imports work in both layouts and every
worktree runs its own code.
"""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"
__all__ = ["Config", "Running", "audit", "serve"]


def __getattr__(name):
    # The Python API (dbproxy/api.py), loaded on first use: ``import dbproxy`` stays cheap and
    # trio-free for the sans-IO codecs (tests/unit/core/test_sansio_kit.py).
    if name in ("serve", "Running"):
        from . import api

        return getattr(api, name)
    if name == "Config":
        from .config import Config

        return Config
    if name == "audit":  # ``import dbproxy; dbproxy.audit.read(...)`` (audit/reader.py)
        import importlib

        return importlib.import_module(f"{__name__}.audit")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_MAPPED = ("engines", "audit")


class _CheckoutLayout(importlib.abc.MetaPathFinder):
    """Resolves ``dbproxy.engines`` and ``dbproxy.audit`` to ``<root>/engines`` and
    ``<root>/audit``; their submodules are then found through the package's
    ``__path__`` by the ordinary path finder."""

    def find_spec(self, fullname, path, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _MAPPED:
            return None
        folder = os.path.join(_ROOT, name)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


if not os.path.isdir(os.path.join(_HERE, "engines")) and all(
        os.path.isfile(os.path.join(_ROOT, name, "__init__.py")) for name in _MAPPED):
    sys.meta_path.insert(0, _CheckoutLayout())
