"""The package's folders are the stages of the chain, and imports point one way: the domain
packages (what the command-line tools reuse) never depend on the proxy that runs them. The tests
share their helpers the same way: through ``tests/support`` and the ``conftest.py`` files, never by
importing one another."""

import ast
from pathlib import Path

import pytest

import nhi_gateway

PACKAGE = Path(nhi_gateway.__file__).parent
TESTS = Path(__file__).resolve().parents[1]
DOMAIN = ("identity", "policy", "approvals", "masking", "recording")
RUNTIME = ("addons", "proxy", "cli")
STAGES = DOMAIN + RUNTIME + ("lookalike", "demo", "bench")


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """Every module a file imports, at top level or inside a function, relative ones resolved."""
    package = path.relative_to(root.parent).with_suffix("").parts
    package = package[:-1] if package[-1] != "__init__" else package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]  # `from pkg import mod`
    return found


def forbidden_imports(package_dir: Path, forbidden: tuple[str, ...], root: Path = PACKAGE) -> list[str]:
    prefixes = tuple(f"nhi_gateway.{name}" for name in forbidden)
    return [f"{path.relative_to(root)}:{line} imports {module}"
            for path in sorted(package_dir.rglob("*.py"))
            for line, module in imported_modules(path, root)
            if module in prefixes or module.startswith(tuple(p + "." for p in prefixes))]


@pytest.mark.parametrize("domain", DOMAIN)
def test_domain_packages_never_import_the_proxy_addons_or_cli(domain):
    assert forbidden_imports(PACKAGE / domain, RUNTIME) == []


def test_addons_never_import_the_master_or_the_cli():
    # proxy.egress (the gateway's own outbound client and its address map) is shared with routing.
    assert forbidden_imports(PACKAGE / "addons", ("proxy.gateway", "proxy.dispatch", "cli")) == []


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The checker itself: a domain module that imports the runtime in any spelling is caught."""
    fake = tmp_path / "nhi_gateway"
    (fake / "policy").mkdir(parents=True)
    (fake / "policy" / "x.py").write_text(
        "import nhi_gateway.addons.guard\n"
        "from nhi_gateway.proxy import gateway\n"
        "from ..cli import main\n"
        "import nhi_gateway.policy.model\n"
        "def f():\n    from nhi_gateway import addons\n")
    found = forbidden_imports(fake / "policy", RUNTIME, root=fake)
    assert sorted({f.split(" imports ")[0] for f in found}) == [
        "policy/x.py:1", "policy/x.py:2", "policy/x.py:3", "policy/x.py:6"]


def test_the_package_root_holds_only_the_stages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert packages == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_it_owns(stage):
    init = PACKAGE / stage / "__init__.py"
    assert init.exists(), f"{stage}/ has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc) > 40, f"{stage}/__init__.py says nothing about what it owns"


def module_file(module: str, importer: Path, tests: Path) -> Path | None:
    """The file under ``tests`` that ``module`` (as ``importer`` spells it) names, if any. A bare
    name is looked for next to the importer: where it is found when the importer's folder is on
    ``sys.path``."""
    parts = module.split(".")
    base = tests.parent if parts[0] == tests.name else importer.parent
    path = base.joinpath(*parts).with_suffix(".py")
    return path if path.is_file() else None


def imports_of_other_tests(tests: Path = TESTS) -> list[str]:
    """Every import, in a module under ``tests``, of a module that is neither in ``support/`` nor a
    ``conftest.py``: a test module, or a helper living among them."""
    found = []
    for path in sorted(tests.rglob("*.py")):
        for line, module in sorted(imported_modules(path, tests)):
            target = module_file(module, path, tests)
            if target and target.name != "conftest.py" and (tests / "support") not in target.parents:
                found.append(f"{path.relative_to(tests)}:{line} imports {module}")
    return found


def test_tests_share_helpers_through_support_and_conftest_only():
    assert imports_of_other_tests() == [], "move what test modules share to tests/support/ (fixtures: a conftest.py)"


def test_the_check_sees_a_test_module_imported_in_any_spelling(tmp_path):
    """The checker itself: a test module that imports another test module, or a helper living among
    the tests, is caught however it spells the import; support modules and conftest.py are not."""
    tests = tmp_path / "tests"
    for folder in ("unit", "e2e", "support"):
        (tests / folder).mkdir(parents=True)
        (tests / folder / "__init__.py").write_text("")
    (tests / "__init__.py").write_text("")
    (tests / "conftest.py").write_text("")
    (tests / "e2e" / "conftest.py").write_text("")
    (tests / "e2e" / "relay.py").write_text("")
    (tests / "e2e" / "test_b.py").write_text("")
    (tests / "support" / "wire.py").write_text("from ..e2e.test_b import x\n")
    (tests / "unit" / "test_c.py").write_text("")
    (tests / "e2e" / "test_a.py").write_text(
        "from .test_b import x\n"
        "from tests.unit.test_c import y\n"
        "from . import test_b\n"
        "import tests.unit.test_c\n"
        "from .relay import Relay\n"
        "def f():\n    from ..unit import test_c\n"
        "import test_b\n"
        "from .conftest import gateway_running\n"
        "from ..conftest import z\n"
        "from ..support.wire import tunnel\n"
        "from ..support import wire\n"
        "from tests.support.wire import exchange\n"
        "import json\n")
    found = imports_of_other_tests(tests)
    assert sorted({f.split(" imports ")[0] for f in found}) == [
        "e2e/test_a.py:1", "e2e/test_a.py:2", "e2e/test_a.py:3", "e2e/test_a.py:4", "e2e/test_a.py:5",
        "e2e/test_a.py:7", "e2e/test_a.py:8", "support/wire.py:1"]
