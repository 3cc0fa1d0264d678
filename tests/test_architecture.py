"""The layers of docs/architecture.md, enforced: which product package may
import which, the agent without the operator, the product without the lab, and
the product's declared dependencies exactly the ones it imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from synfleet import cli

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ROOT / "operator" / "synfleet"

# Each package of the product, and the packages below it that it may import
# (its own modules always). Lower layers come first; nothing may import upward.
MAY_IMPORT = {
    "abi": set(),
    "cookie": set(),
    "bpf": set(),
    "kube": set(),
    "config": {"abi", "cookie"},
    "contract": {"config", "cookie"},
    "dataplane": {"abi", "bpf", "config", "cookie"},
    "agent": {"abi", "bpf", "config", "contract", "cookie", "dataplane", "kube"},
    "resources": {"abi", "config", "contract", "cookie"},
    "operator": {"abi", "config", "contract", "cookie", "kube", "resources"},
    "cli": {"agent", "config", "operator", "resources"},
}
# Third-party distributions the product's wheel requires, by the name it imports.
DISTRIBUTIONS = {"aiohttp": "aiohttp", "kopf": "kopf", "kubernetes": "kubernetes", "prometheus_client": "prometheus-client",
                 "pydantic": "pydantic", "pyroute2": "pyroute2", "yaml": "PyYAML"}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # `from synfleet import contract` imports the package synfleet.contract
            if node.module == "synfleet":
                found |= {f"synfleet.{a.name}" for a in node.names}
    return found


def _layer(path: Path) -> str:
    return path.relative_to(PRODUCT).parts[0].removesuffix(".py")


def _product_modules() -> list[Path]:
    return sorted(p for p in PRODUCT.rglob("*.py") if p.name != "__init__.py" or p.parent != PRODUCT)


def test_every_product_package_has_a_place_in_the_layers():
    assert {_layer(p) for p in _product_modules()} == set(MAY_IMPORT)


def test_the_layers_are_acyclic():
    order = list(MAY_IMPORT)
    for layer, below in MAY_IMPORT.items():
        assert all(order.index(b) < order.index(layer) for b in below), f"{layer} may import a layer above it"


@pytest.mark.parametrize("path", _product_modules(), ids=lambda p: str(p.relative_to(PRODUCT)))
def test_product_modules_import_only_the_layers_below_them(path):
    layer = _layer(path)
    for module in _imports(path):
        parts = module.split(".")
        assert parts[0] != "synfleet_lab", f"{path.name} imports the lab ({module}); the product must not"
        if parts[0] != "synfleet" or len(parts) == 1:
            continue
        target = parts[1]
        assert target == layer or target in MAY_IMPORT[layer], \
            f"synfleet.{layer} may not import {module} (allowed: {sorted(MAY_IMPORT[layer])})"


def test_the_product_requires_exactly_the_distributions_it_imports():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    imported = {m.split(".")[0] for p in _product_modules() for m in _imports(p)} - stdlib - {"synfleet"}
    assert imported <= set(DISTRIBUTIONS), f"imported but not declared: {sorted(imported - set(DISTRIBUTIONS))}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in declared}
    assert names == {DISTRIBUTIONS[m] for m in imported}


def test_running_the_agent_loads_nothing_of_the_operator():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, synfleet.agent.agent, synfleet.agent.sources, synfleet.cli; "
                               "print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(("synfleet.operator", "synfleet.resources", "synfleet_lab",
                                                   "kopf", "matplotlib"))]


def test_the_agent_and_operator_commands_load_no_other_distribution(monkeypatch, capsys):
    asked: list[str] = []
    monkeypatch.setattr(cli, "entry_points", lambda group: asked.append(group) or [])
    for command in cli.PRODUCT_COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    assert asked == []
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert asked == [cli.COMMANDS_GROUP]
    assert "come with the lab" in capsys.readouterr().out


def test_the_labs_commands_join_the_cli_through_its_entry_points():
    lab = {ep.name: ep.value for ep in entry_points(group=cli.COMMANDS_GROUP)}
    assert lab == {name: f"synfleet_lab.commands:{name}" for name in ("bench", "check", "cluster", "demo")}
