"""Layering: the core knows no engine, no engine reaches into another.

The rule.  The core is every module of the ``dbproxy`` package and its
subpackages (``dbproxy/**/*.py``: ``identity/``, ``listen/``).  It never imports an engine, and it carries no
protocol's knowledge as branches on a protocol's name (the statement
lexers live with their engines behind ``dbproxy.statements.Dialect``).
One place composes the program: ``dbproxy/registry.py``'s ``default_registry()``
(used by the command line, ``dbproxy.serve`` and ``dbproxy.Config.load``) imports ``engines.default_registry`` lazily, inside that
function — so importing any core module, the CLI included, loads no
engine, and the registry that names the engines is built once, in
``engines/__init__.py``.  An engine imports the core and its own modules,
never another engine's.

Checked on the source (AST: every ``import``, at any depth, so a lazy
import counts too) and at run time (importing every core module in a
fresh interpreter leaves ``engines`` unloaded).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
CORE = sorted((ROOT / "dbproxy").rglob("*.py"))
ENGINES = sorted(p for p in (ROOT / "engines").iterdir() if p.is_dir() and (p / "__init__.py").exists())
# The composition root: (file, function) allowed to import the engine registry.
COMPOSITION_ROOT = ("dbproxy/registry.py", "default_registry")
PROTOCOL_NAMES = {"postgres", "postgresql", "sql", "cassandra", "cql", "mongo", "mongodb"}


def _imports(path: pathlib.Path) -> list[tuple[str, int, str | None]]:
    """(absolute module name, line, enclosing function or None) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rpartition(".")[0] if path.stem != "__init__" else _module_name(path)
    out: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, func) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                # ``from engines import postgres`` / ``from . import x``: the names may be modules too
                out.append((module, child.lineno, func))
                out.extend((f"{module}.{alias.name}", child.lineno, func) for alias in child.names)
            visit(child, func)

    visit(tree, None)
    return out


def _is_engine(module: str) -> bool:
    return module == "dbproxy.engines" or module.startswith("dbproxy.engines.")


def test_core_imports_no_engine():
    found = []
    for path in CORE:
        rel = str(path.relative_to(ROOT))
        for module, line, func in _imports(path):
            if _is_engine(module) and (rel, func) != COMPOSITION_ROOT:
                found.append(f"{rel}:{line} imports {module}" + (f" (in {func})" if func else ""))
    assert not found, "the core imports engines:\n" + "\n".join(sorted(set(found)))


def test_composition_root_is_lazy_and_single():
    rel, func = COMPOSITION_ROOT
    hits = [(m, line, f) for m, line, f in _imports(ROOT / rel) if _is_engine(m)]
    assert hits and all(f == func for _, _, f in hits), hits


def test_importing_the_core_loads_no_engine():
    names = [_module_name(p) for p in CORE if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'dbproxy.engines' or m.startswith('dbproxy.engines.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_core_has_no_protocol_branches():
    """No comparison with a protocol's name and no table keyed by one: that knowledge lives in the engine."""
    found = []
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                operands = [k for k in node.keys if k is not None]
            else:
                continue
            for operand in operands:
                for sub in ast.walk(operand):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.lower() in PROTOCOL_NAMES:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sub.value!r}")
    assert not found, "the core branches on protocol names:\n" + "\n".join(found)


def test_engines_import_no_other_engine():
    found = []
    for engine in ENGINES:
        for path in sorted(engine.rglob("*.py")):
            for module, line, _ in _imports(path):
                parts = module.split(".")
                if parts[0] == "dbproxy":
                    parts = parts[1:]
                if len(parts) > 1 and parts[0] == "engines" and parts[1] != engine.name and (ROOT / "engines" / parts[1]).is_dir():
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not found, "engines import each other:\n" + "\n".join(found)


AUDIT = sorted((ROOT / "audit").rglob("*.py"))


def test_audit_imports_no_engine():
    """The audit side (recorder, link, worker, sinks) knows no engine: the worker learns each
    tap's class from the O frame the engine's session opened (``SessionAudit.tap_open(Tap)``)
    and reads only the config's ``audit`` section (``load_audit_config``)."""
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}" + (f" (in {func})" if func else "")
        for path in AUDIT
        for module, line, func in _imports(path)
        if _is_engine(module)
    ]
    assert not found, "the audit side imports engines:\n" + "\n".join(sorted(set(found)))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] != "dbproxy":  # engines/ and audit/ install as dbproxy.engines, dbproxy.audit
        parts.insert(0, "dbproxy")
    return ".".join(parts)


def test_no_import_cycles():
    """No cycle of imports among the project's modules, lazy imports included (the config ↔
    audit sinks ↔ TLS cycle is gone: they share ``dbproxy.configtypes``).  A package's
    ``__init__`` importing its own submodules is not a cycle."""
    files = [*CORE, *AUDIT, *(p for e in ENGINES for p in e.rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, _, _ in _imports(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not module.startswith(name + ".") and not name.startswith(module + "."):
                targets.add(module)
        graph[name] = targets
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
