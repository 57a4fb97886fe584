"""The package boundaries of the layout: the coordinator is a client and
never loads the plugin package (nor, through it, the C extension); the
product packages import each other without a cycle and use no other
module's private name; the coordinator's folders are layers; and tests/
keeps its modules to itself (nothing else imports them, no test module
imports another, helpers are imported one way)."""

import ast
import os
import pathlib
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


# ------------------------------------------------------------------ imports
#
# The product packages import each other without a cycle, and no module
# uses another module's private name.  Both are read from the source with
# ``ast`` (every import statement, also those inside functions), so the
# checks need no import of the code they check.

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT = ("coordinator", "nbdplugin", "native", "wire", "harness", "vm")


def _modules() -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every product module."""
    out = {}
    for pkg in PRODUCT:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_package(name: str, mods: dict[str, pathlib.Path]) -> bool:
    return mods[name].name == "__init__.py"


def _base(mod: str, node: ast.ImportFrom, mods) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    pkg = mod if _is_package(mod, mods) else mod.rpartition(".")[0]
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(mod: str, tree: ast.AST, mods) -> set[str]:
    """The product modules that importing ``mod`` runs: every module an
    import statement names, with the packages around it (an import of
    ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too), except the
    packages ``mod`` itself is in (they are running already)."""
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(mod, node, mods)
            named.add(base)
            named.update(f"{base}.{a.name}" for a in node.names
                         if f"{base}.{a.name}" in mods)
    own = set(_ancestors(mod))
    return {a for n in named for a in _ancestors(n) if a in mods and a not in own}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, ast.parse(f.read_text(), str(f)), mods)
            for m, f in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or None."""
    state: dict[str, int] = {}          # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(mod: str, tree: ast.AST, mods) -> list[str]:
    """Where ``mod`` uses another module's private name: ``from X import
    _name``, ``import X._mod`` or ``X._name`` with X a product module.  A
    private module (``native._bitmap``) is its package's: modules of the
    same package may import it."""
    found = []
    aliases: dict[str, str] = {}        # local name -> product module it is

    def foreign(target: str) -> bool:
        """A private ``target`` (a dotted name) that ``mod`` may not use."""
        *pkg, last = target.split(".")
        if not _private(last):
            return False
        return not mod.startswith(".".join(pkg) + ".")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PRODUCT:
                    parts = a.name.split(".")
                    for i in range(1, len(parts) + 1):
                        if foreign(".".join(parts[:i])):
                            found.append(f"{mod}:{node.lineno}: import {a.name}")
                    aliases[a.asname or parts[0]] = a.name if a.asname else parts[0]
        elif isinstance(node, ast.ImportFrom):
            base = _base(mod, node, mods)
            if base.split(".")[0] not in PRODUCT:
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if foreign(base) or foreign(full):
                    found.append(f"{mod}:{node.lineno}: from {base} import {a.name}")
                if full in mods:
                    aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, v = [node.attr], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name) and v.id in aliases:
                target = ".".join([aliases[v.id]] + chain[::-1])
                if foreign(target):
                    found.append(f"{mod}:{node.lineno}: {target}")
    return found


def _foreign_attributes(mod: str, tree: ast.AST) -> set[str]:
    """``x._name`` in ``mod`` where nothing in ``mod`` defines ``_name`` (no
    def, class, assignment, argument or import of it): another object's
    private attribute, whatever module ``x`` comes from.  Reported as
    "module .name", without a line number."""
    defined = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            defined.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            defined.add(n.id)
        elif isinstance(n, ast.arg):
            defined.add(n.arg)
        elif isinstance(n, ast.alias):
            defined.add(n.asname or n.name.split(".")[0])
    return {f"{mod} .{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and _private(n.attr) and n.attr not in defined}


# Private names of code outside the product, used knowingly.
FOREIGN_ALLOWED = {
    "coordinator.cli ._actions",            # argparse: no public way to list
    "coordinator.cli ._SubParsersAction",   # subparsers (cli/__init__.py says so)
    "nbdplugin.plugin ._exit",              # os._exit: documented, public in all but name
    "native.copyengine ._o",                # python3-libnbd's handle pointer: no
}                                           # public accessor (copyengine.py says so)


def test_the_product_packages_import_without_a_cycle():
    """No import cycle among coordinator, nbdplugin, native, wire, harness, vm."""
    assert _cycle(_graph()) is None


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a -> b -> a is found, a DAG is not."""
    assert _cycle({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_a_function_level_import_counts():
    """An import inside a function is an edge of the graph too."""
    mods = _modules()
    tree = ast.parse("def f():\n    from .cycle import Mirror\n")
    assert "coordinator.mirror.cycle" in _imports("coordinator.mirror.events", tree, mods)


def test_no_module_uses_another_modules_private_name():
    """No ``from X import _name``, ``X._name`` or ``import X._mod`` across modules."""
    mods = _modules()
    found = [use for m, f in mods.items()
             for use in _private_uses(m, ast.parse(f.read_text(), str(f)), mods)]
    assert found == []


def test_no_module_reads_another_objects_private_attribute():
    """No ``x._name`` where the module defines no ``_name`` (allow-list aside)."""
    found = set()
    for m, f in _modules().items():
        found |= _foreign_attributes(m, ast.parse(f.read_text(), str(f)))
    assert sorted(found - FOREIGN_ALLOWED) == []


def test_the_private_attribute_check_finds_them():
    """The check above can fail: ``vol._pwrite_all`` is found, ``self._x`` with
    ``self._x = 1`` in the module is not."""
    src = "class A:\n    def f(self, vol):\n        self._x = 1\n        vol._pwrite_all(self._x)\n"
    assert _foreign_attributes("m", ast.parse(src)) == {"m ._pwrite_all"}


def test_the_private_name_check_finds_them():
    """The check above can fail: each of the three spellings is found."""
    mods = _modules()
    src = ("from coordinator import direction as dirn\n"
           "from coordinator.direction import _x\n"
           "import coordinator.cli\n"
           "dirn._why({})\n"
           "coordinator.cli._parser()\n"
           "from native._bitmap import ffi\n")
    found = _private_uses("coordinator.roles.failover", ast.parse(src), mods)
    assert [f.split(": ", 1)[1] for f in found] == [
        "from coordinator.direction import _x", "from native._bitmap import ffi",
        "coordinator.direction._why", "coordinator.cli._parser"]
    # a package's own private module is its package's to import
    assert _private_uses("native.bitmap", ast.parse("from native._bitmap import ffi\n"),
                         mods) == []


# The coordinator's folders are layers: each imports only those below it.
LAYERS = ("coordinator.cli", "coordinator.roles", "coordinator.mirror", "coordinator.group")


def _layer(mod: str) -> int:
    """0 for cli ... 3 for group, 4 for the modules at the top of coordinator/."""
    return next((i for i, p in enumerate(LAYERS) if mod == p or mod.startswith(p + ".")),
                len(LAYERS))


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {n}" for m, deps in graph.items() if m.startswith("coordinator")
                  for n in deps if n.startswith("coordinator.") and _layer(n) < _layer(m))


def test_the_coordinator_folders_import_only_downward():
    """cli -> roles -> mirror -> group -> the rest of coordinator/, never upward."""
    assert _upward(_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    """The check above can fail: mirror importing roles, or session importing
    group, is upward; cli importing mirror is not."""
    assert _upward({"coordinator.mirror.cycle": {"coordinator.roles.failover"},
                    "coordinator.session": {"coordinator.group"},
                    "coordinator.cli.mirror_cmds": {"coordinator.mirror"}}) == [
        "coordinator.mirror.cycle -> coordinator.roles.failover",
        "coordinator.session -> coordinator.group"]
# ---------------------------------------------------------------- tests/ and harness/
#
# Rigs that the demo or a bench needs live in harness/ (no pytest there);
# tests/ holds the test modules, their fixtures (conftest.py, never
# imported) and their plain helpers (cgtest.py and the *rig modules),
# imported by their plain names (pytest puts tests/ on sys.path) -- one name
# per module, so that no helper is loaded twice under two names.

TOP = str(ROOT)
TESTS = os.path.join(TOP, "tests")
_SKIP_DIRS = {".venv", ".git", ".cache", "build", "__pycache__", "node_modules"}


def _sources(top: str):
    for d, dirs, files in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _import_lines(path: str):
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
    return os.path.relpath(path, TOP)


def test_nothing_outside_tests_imports_from_tests():
    """No module outside tests/ imports a module of tests/ (as ``tests.x``
    or by a plain name after putting tests/ on sys.path)."""
    local = _test_dir_modules()
    bad = []
    for path in _sources(TOP):
        if path.startswith(TESTS + os.sep):
            continue
        for line, name in _import_lines(path):
            top = name.split(".")[0]
            if top == "tests" or top in local:
                bad.append(f"{_rel(path)}:{line} imports {name}")
        with open(path) as f:
            if '"tests")' in f.read():               # os.path.join(TOP, "tests")
                bad.append(f"{_rel(path)} puts tests/ on a path")
    assert not bad, "move shared rigs to harness/: " + "; ".join(dict.fromkeys(bad))


def test_no_module_imports_a_test_module():
    """A test_*.py module is imported by pytest only: shared parts live in
    a helper module (tests/cgtest.py, tests/*rig*.py) or in harness/."""
    bad = [f"{_rel(path)}:{line} imports {name}"
           for path in _sources(TOP)
           for line, name in _import_lines(path)
           if any(part.startswith("test_") for part in name.split("."))]
    assert not bad, "; ".join(dict.fromkeys(bad))


def test_tests_import_their_helpers_one_way():
    """Inside tests/, helpers are imported by plain name, never as
    ``tests.x``, and conftest.py is never imported (its helpers are in
    cgtest.py); pytest_plugins names plain modules too."""
    bad = []
    for path in _sources(TESTS):
        for line, name in _import_lines(path):
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
    mods = sorted(f"harness.{f[:-3]}" for f in os.listdir(os.path.join(TOP, "harness"))
                  if f.endswith(".py") and f != "__init__.py")
    assert {"harness.sites", "harness.workload", "harness.mirrorrig"} <= set(mods)
    local = _test_dir_modules()
    code = ("import sys; " + "; ".join(f"import {m}" for m in mods) + "; "
            "print(' '.join(m for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=TOP).stdout.split()
    bad = sorted(m for m in out if m.split(".")[0] in {"pytest", "_pytest", "tests"} | local)
    assert not bad, f"importing harness loads {bad}"
