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
