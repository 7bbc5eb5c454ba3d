"""The import graph is one-way: server -> model <- training (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "model": {"training", "server", "bench"},
    "training": {"server", "bench"},
    "server": {"training", "bench"},
}


def imported_top_level_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downstream(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_level_packages(path) & FORBIDDEN[package])
        for path in files
    }
    assert {path: bad for path, bad in offenders.items() if bad} == {}


def test_weights_are_never_unpickled() -> None:
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.parts[len(ROOT.parts)] in {"model", "training", "server", "bench"}:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                    kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kwargs.get("weights_only") == "True", f"{path}: {ast.unparse(node)}"
                assert not (
                    isinstance(node, ast.Import) and any(a.name == "pickle" for a in node.names)
                ), path
