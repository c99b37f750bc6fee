"""The router's wings stand alone: no route module (one that registers routes) imports another; what
several of them need is in `pier.router.shared`. Read from the source, not run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "router" / "src" / "pier" / "router"


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent.parent).with_suffix("").parts)


MODULES = {_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
ROUTES = sorted(
    name
    for name, tree in MODULES.items()
    if any(isinstance(node, ast.FunctionDef) and node.name in ("add_routes", "add_page") for node in tree.body)
)


def _imports(tree: ast.Module) -> set[str]:
    """The modules a module imports (`from pier.router.rest import v1` names pier.router.rest.v1)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_route_modules_are_the_wings_own() -> None:
    assert ROUTES == [
        "pier.router.auth.protected_resource",
        "pier.router.mcp.aggregate",
        "pier.router.mcp.relay",
        "pier.router.mcp.websocket",
        "pier.router.rest.accounts",
        "pier.router.rest.bridgekit",
        "pier.router.rest.dashboard",
        "pier.router.rest.portal",
        "pier.router.rest.registry",
        "pier.router.rest.v1",
    ]


@pytest.mark.parametrize("module", ROUTES)
def test_no_route_module_imports_another(module: str) -> None:
    others = sorted(_imports(MODULES[module]) & (set(ROUTES) - {module}))
    assert not others, f"{module} imports route modules {others}: what both need belongs in pier.router.shared"
