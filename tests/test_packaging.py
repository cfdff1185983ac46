"""pyproject.toml against the code: what the packages import is declared, what is declared is imported."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hgrn2", "lightning_modules", "datamodules")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings, self-references (``hgrn2[data]``) left out."""
    names = {normalized(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in requirements}
    return names - {"hgrn2"}


def third_party_imports(folders: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under ``folders``, with the files importing them."""
    found: dict[str, set[str]] = {}
    for package in folders:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def declared_for_users() -> set[str]:
    """The main dependencies and the user-facing extras (dev only serves the tests and notebooks)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    users = [req for name, reqs in extras.items() if name != "dev" for req in reqs]
    return requirement_names(PYPROJECT["project"]["dependencies"] + users)


def test_every_third_party_import_of_the_packages_is_declared():
    distributions = packages_distributions()
    declared = declared_for_users()
    missing = {
        module: sorted(files)
        for module, files in third_party_imports().items()
        if not {normalized(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_dependency_is_imported_by_the_packages_or_the_benchmarks():
    distributions = packages_distributions()
    folders = (*PACKAGES, "benchmarks", "experiments")  # the `bench` extra serves the scripts
    imported = {normalized(d) for module in third_party_imports(folders) for d in distributions.get(module, [module])}
    unused = declared_for_users() - imported
    assert not unused, f"declared in pyproject.toml but imported nowhere in {folders}: {sorted(unused)}"


def test_license_file_is_the_mit_license_pyproject_names():
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "hgrn2 contributors" in text.splitlines()[2]


def test_the_digits_demo_names_the_extra_to_install_without_scikit_learn(monkeypatch):
    from datamodules.digits import load_digit_tensors

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install -e '\.\[demo\]'"):
        load_digit_tensors()
