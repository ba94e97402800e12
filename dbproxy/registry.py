"""The composition root: the one place in the core that names the engines.

``default_registry()`` imports ``dbproxy.engines`` lazily, inside the
function, so importing any core module loads no engine
(tests/unit/core/test_layering.py).  The command line, ``dbproxy.serve`` and
``dbproxy.Config.load`` all get their engines here.
"""

from __future__ import annotations

from typing import Any


def default_registry() -> Any:
    from dbproxy.engines import default_registry as engines_registry

    return engines_registry()
