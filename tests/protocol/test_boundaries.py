"""Programs keep their boundaries: the agent ships to GPU hosts without the server, the simulator or the
dev tools (nor Flask and sqlite-utils, which only the server needs); protocol/ is shared and imports neither.

Two checks, because each misses what the other sees: importing every module in a fresh interpreter and
listing `sys.modules` catches an import however it is written (`importlib`, `__import__`, through another
package, inside `try/except ImportError`); reading every module's syntax tree catches an import inside a
function that merely importing the module never runs.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEVER_ON_A_GPU_HOST = {"server", "sim", "devtools", "bench", "tests", "flask", "sqlite_utils"}
FORBIDDEN = {
    "agent": NEVER_ON_A_GPU_HOST,
    "protocol": NEVER_ON_A_GPU_HOST | {"agent"},
}
LOADED_TOP_LEVEL = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def module_names(package: str) -> list[str]:
    """Every module of ``package`` (found on disk, so a new one is checked without editing this test)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_names(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, at any depth, and of `import_module("...")` calls."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_of_a_shared_or_shipped_package_loads_nothing_it_must_not_need(package):
    modules = module_names(package)
    assert len(modules) > 1, f"no modules found under {package}/"
    result = subprocess.run([sys.executable, "-c", LOADED_TOP_LEVEL, *modules], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    unwanted = set(json.loads(result.stdout)) & FORBIDDEN[package]
    assert not unwanted, f"importing {package}/ loads {sorted(unwanted)}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_of_a_shared_or_shipped_package_imports_what_it_must_not_even_lazily(package):
    offending = {str(path.relative_to(ROOT)): sorted(imported_names(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert offending, f"no modules found under {package}/"
    assert not {path: names for path, names in offending.items() if names}
