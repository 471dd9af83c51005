"""The tree shows the architecture: wings whose imports point one way, and a head unit that
carries nothing of the cloud or the development tools."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agent"

# Rank of each wing: a module may import modules of its own wing or of a lower rank.
# cloud and dev share a rank but may not import each other (checked separately).
RANKS = {
    "agent": 0, "agent.errors": 0, "agent.schema": 1, "agent.config": 2,
    "agent.can": 3, "agent.signals": 4, "agent.uplink": 5, "agent.service": 6,
    "agent.cloud": 7, "agent.dev": 7,
    "agent.cli": 9, "agent.__main__": 9,
}
CLOUD_EXTRA = ("fastapi", "uvicorn", "starlette", "pydantic", "psycopg", "psycopg_pool",
               "prometheus_client")


def wing(module: str) -> str:
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in RANKS:
            return name
    raise AssertionError(f"{module}: belongs to no wing; add it to RANKS")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def agent_imports(path: Path) -> set[str]:
    """Every agent module this file imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "agent")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                name = module_name(path)
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "agent":
                found.add(target)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_wing():
    names = {module_name(p) for p in MODULES}
    assert {"agent.service.daemon", "agent.cloud.watch", "agent.dev.pki", "agent.can.dbc"} <= names
    for name in names:
        wing(name)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    source = module_name(path)
    own = wing(source)
    for target in agent_imports(path):
        other = wing(target)
        assert RANKS[other] <= RANKS[own] or other == own, \
            f"{source} imports {target}: {other} is above {own}"
        if own != other and {own, other} == {"agent.cloud", "agent.dev"}:
            pytest.fail(f"{source} imports {target}: cloud and dev are apart")


def test_the_rule_catches_an_upward_import(tmp_path):
    # The checker itself must see a function-level import and a relative one.
    bad = PACKAGE / "can" / "source.py"
    text = "def f():\n    from agent.uplink.outbox import Outbox\n"
    (tmp_path / "x.py").write_text(text)
    assert agent_imports(tmp_path / "x.py") == {"agent.uplink.outbox"}
    assert RANKS[wing("agent.uplink.outbox")] > RANKS[wing(module_name(bad))]


def loaded_by(module: str) -> list[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    return json.loads(out.stdout)


def test_head_unit_closure_holds_nothing_of_the_cloud_or_dev():
    loaded = loaded_by("agent.service.daemon")
    assert "agent.service.daemon" in loaded and "agent.uplink.mqtt" in loaded
    # cryptography too: the daemon signs and reads certificates through libcrypto (~10 MiB
    # less resident); the package is only its fallback, imported when libcrypto is unusable.
    off_car = [m for m in loaded
               if m.startswith(("agent.cloud", "agent.dev"))
               or m.split(".")[0] in CLOUD_EXTRA + ("cryptography",)]
    assert off_car == []
    # The DBC files are parsed in a start-up child (agent.signals.vehicle.compile_decoder).
    assert [m for m in loaded if m.split(".")[0] in ("cantools", "textparser", "bitstruct")] == []
