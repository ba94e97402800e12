"""Packaging: the wheel installs exactly one top-level import package, ``dbproxy``.

The repository keeps ``engines/`` and ``audit/`` beside ``dbproxy/``; pyproject's
``package-dir`` installs them as ``dbproxy.engines`` and ``dbproxy.audit``, and
``dbproxy/__init__.py`` resolves the same names in a checkout.  These tests build
the real wheel with pip, install it into a fresh virtual environment, and import
from it outside the checkout.
"""

import ast
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
FOLDERS = {"dbproxy": ROOT / "dbproxy", "dbproxy.engines": ROOT / "engines", "dbproxy.audit": ROOT / "audit"}


def _packages_on_disk() -> set[str]:
    found = set()
    for prefix, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((prefix, *rel)) if rel else prefix)
    return found


def test_pyproject_lists_every_package_folder():
    """A package folder missing from the list would be left out of the wheel silently."""
    setuptools_table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools_table["packages"]) == _packages_on_disk()
    assert setuptools_table["package-dir"] == {"dbproxy": "dbproxy", "dbproxy.engines": "engines", "dbproxy.audit": "audit"}


def test_no_module_imports_the_old_top_level_names():
    """Product code, tests and scripts import ``dbproxy.engines`` / ``dbproxy.audit``:
    a leftover ``import engines`` would load a second copy of a module in a checkout
    and fail outright once installed."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {".git", "node_modules", "build"} & set(path.parts) or ".venv" in str(path):
            continue
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("engines", "audit"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not offenders, "\n".join(offenders)


def test_checkout_resolves_mapped_packages_to_its_own_folders():
    code = ("import dbproxy.engines.postgres.codec as c, dbproxy.audit.worker as w, sys;"
            "print(c.__file__); print(w.__file__); print('engines' in sys.modules, 'audit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str(ROOT / "engines" / "postgres" / "codec.py")
    assert out[1] == str(ROOT / "audit" / "worker.py")
    assert out[2] == "False False"


@pytest.mark.slow
def test_wheel_installs_only_dbproxy(tmp_path):
    """Build the wheel, list its top-level names, install it in a fresh venv and use it
    from a directory that is not the checkout."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    [wheel] = dist.glob("dbproxy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert top == {"dbproxy"}
        assert "dbproxy/engines/postgres/codec.py" in names and "dbproxy/audit/worker.py" in names
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
        if top_level:
            assert zf.read(top_level).decode().split() == ["dbproxy"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    code = ("import dbproxy, dbproxy.engines, dbproxy.audit.worker, dbproxy.engines.postgres.engine, sys;"
            "print(dbproxy.engines.__file__); print(sorted(n for n in ('engines','audit') if n in sys.modules))")
    out = subprocess.run([str(py), "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith(str(venv)) and out[0].endswith("dbproxy/engines/__init__.py"), out
    assert out[1] == "[]"
    # the audit worker's module entry point resolves from the installed wheel too
    help_run = subprocess.run([str(py), "-I", "-m", "dbproxy.audit.worker", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert "No module named" not in help_run.stderr, help_run.stderr
