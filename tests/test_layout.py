"""The package boundaries of the layout: the coordinator is a client and
never loads the plugin package (nor, through it, the C extension)."""

import subprocess
import sys


def _loaded_after(stmt: str) -> set[str]:
    code = (f"import sys; {stmt}; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('nbdplugin', 'native', 'harness')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_loading_a_session_loads_no_plugin_code():
    """session + CLI import neither nbdplugin, native nor the test harness."""
    assert _loaded_after("import coordinator.cli, coordinator.session") == set()


def test_the_plugin_package_does_load_the_extension():
    """The check above can fail: the plugin side does load native."""
    assert "native.bitmap" in _loaded_after("import nbdplugin.volume")


# ---------------------------------------------------------------- tests/ and harness/
#
# Rigs that the demo or a bench needs live in harness/ (no pytest there);
# tests/ holds the test modules, their fixtures (conftest.py, never
# imported) and their plain helpers (cgtest.py and the *rig modules),
# imported by their plain names (pytest puts tests/ on sys.path) -- one name
# per module, so that no helper is loaded twice under two names.

import ast  # noqa: E402
import os  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
_SKIP_DIRS = {".venv", ".git", ".cache", "build", "__pycache__", "node_modules"}


def _sources(top: str):
    for d, dirs, files in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _imports(path: str):
    """(line, dotted module name) of every absolute import in ``path``,
    ``from m import a`` giving m and m.a."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for a in node.names:
                yield node.lineno, f"{node.module}.{a.name}"


def _test_dir_modules() -> set[str]:
    return {f[:-3] for f in os.listdir(TESTS) if f.endswith(".py")}


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def test_nothing_outside_tests_imports_from_tests():
    """No module outside tests/ imports a module of tests/ (as ``tests.x``
    or by a plain name after putting tests/ on sys.path)."""
    local = _test_dir_modules()
    bad = []
    for path in _sources(ROOT):
        if path.startswith(TESTS + os.sep):
            continue
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top == "tests" or top in local:
                bad.append(f"{_rel(path)}:{line} imports {name}")
        with open(path) as f:
            if '"tests")' in f.read():               # os.path.join(ROOT, "tests")
                bad.append(f"{_rel(path)} puts tests/ on a path")
    assert not bad, "move shared rigs to harness/: " + "; ".join(dict.fromkeys(bad))


def test_no_module_imports_a_test_module():
    """A test_*.py module is imported by pytest only: shared parts live in
    a helper module (tests/cgtest.py, tests/*rig*.py) or in harness/."""
    bad = [f"{_rel(path)}:{line} imports {name}"
           for path in _sources(ROOT)
           for line, name in _imports(path)
           if any(part.startswith("test_") for part in name.split("."))]
    assert not bad, "; ".join(dict.fromkeys(bad))


def test_tests_import_their_helpers_one_way():
    """Inside tests/, helpers are imported by plain name, never as
    ``tests.x``, and conftest.py is never imported (its helpers are in
    cgtest.py); pytest_plugins names plain modules too."""
    bad = []
    for path in _sources(TESTS):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top == "tests":
                bad.append(f"{_rel(path)}:{line} imports {name} (import it by its plain name)")
            elif top == "conftest":
                bad.append(f"{_rel(path)}:{line} imports conftest (use cgtest)")
    with open(os.path.join(TESTS, "conftest.py")) as f:
        tree = ast.parse(f.read())
    plugins = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(getattr(t, "id", None) == "pytest_plugins" for t in n.targets)]
    assert plugins, "conftest.py no longer sets pytest_plugins: update this test"
    for value in plugins:
        for elt in value.elts:
            if elt.value.startswith("tests."):
                bad.append(f"tests/conftest.py: pytest_plugins names {elt.value}")
    assert not bad, "; ".join(dict.fromkeys(bad))


def test_harness_loads_neither_pytest_nor_tests():
    """Every harness module imports without pytest and without any module
    of tests/ (the demo and the benches run outside pytest)."""
    mods = sorted(f"harness.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "harness"))
                  if f.endswith(".py") and f != "__init__.py")
    assert {"harness.sites", "harness.workload", "harness.mirrorrig"} <= set(mods)
    local = _test_dir_modules()
    code = ("import sys; " + "; ".join(f"import {m}" for m in mods) + "; "
            "print(' '.join(m for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    bad = sorted(m for m in out if m.split(".")[0] in {"pytest", "_pytest", "tests"} | local)
    assert not bad, f"importing harness loads {bad}"
