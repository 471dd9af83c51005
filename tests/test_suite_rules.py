"""Rules the test suite keeps about itself (developers' guide): shared helpers live in
tests/support or conftest, never in another test module; no assertion that cannot fail
(``x >= 0`` on a count); Hypothesis is derandomized in CI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from hypothesis import settings

TESTS = Path(__file__).resolve().parent
MODULES = sorted(p for p in TESTS.rglob("test_*.py"))


def test_no_test_module_imports_another_test_module():
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(TESTS)}: {name}" for name in names
                          if name.split(".")[-1].startswith("test_")]
    assert offenders == []


# ``assert n >= 0`` / ``assert a >= 0 and b >= 0`` where n is a counter: always true.
_NEVER_FAILS = re.compile(r"^\s*assert\s+[\w.\[\]\"'()]+\s*>=\s*0\s*(,|#|$|and\s+[\w.\[\]\"'()]+"
                          r"\s*>=\s*0\s*$)")


def test_no_assertion_of_a_count_being_at_least_zero():
    offenders = [f"{path.relative_to(TESTS)}:{n}: {line.strip()}"
                 for path in MODULES
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if _NEVER_FAILS.search(line)]
    assert offenders == []


def test_ci_profile_is_derandomized():
    profile = settings.get_profile("ci")
    assert profile.derandomize is True and profile.database is None
