"""Shared fixtures: real slaves (nbdkit + plugin) in a private directory.

Where CI=true, a test that needs nbdkit, libnbd or qemu must run: ``need()``
fails there instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from coordinator import launch  # noqa: E402

pytest_plugins = ["tests.vmfixture", "tests.tlsrig"]

IN_CI = os.environ.get("CI") == "true"


def need(*binaries: str) -> None:
    """Skip (or, in CI, fail) unless every binary is on PATH."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        msg = f"needs {', '.join(missing)} (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def need_netns() -> None:
    """Skip (or, in CI, fail) unless network namespaces can be made here."""
    # Imported here, not at the top: pyroute2 takes ~0.16 s to import and
    # most test runs never make a namespace.
    from tests import sites
    why = sites.unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` every 5 ms; fail the test if it is not true in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def closing_all(factory):
    """The body of a factory fixture: yields ``make(...)``, which builds with
    ``factory``; everything built is closed at the end, even after a failure."""
    made = []

    def make(*args, **kw):
        obj = factory(*args, **kw)
        made.append(obj)
        return obj

    try:
        yield make
    finally:
        for obj in made:
            obj.close()


@pytest.fixture
def run_dir(tmp_path):
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    d = tmp_path
    if len(str(d)) > 60:
        import tempfile
        d = tempfile.mkdtemp(prefix="cgm-")
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(d)


@pytest.fixture
def slaves(run_dir):
    """Factory: ``slaves(name, volumes=[(vol, size)], **spec)`` starts a slave.

    Every slave started is stopped (SIGTERM, then SIGKILL) and reaped at the end.
    """
    need("nbdkit")
    started: list[launch.SlaveProcess] = []

    def make(name="s1", volumes=(("a", 16 << 20),), start=True, **kw):
        spec = launch.SlaveSpec(
            name=name,
            statedir=os.path.join(run_dir, name),
            nbd_socket=os.path.join(run_dir, name + ".sock"),
            control=os.path.join(run_dir, name + ".ctl"),
            volumes=[(v, os.path.join(run_dir, f"{name}-{v}.img"), size)
                     for v, size in volumes],
            **kw,
        )
        if not start:
            return spec
        proc = launch.start(spec)
        started.append(proc)
        return proc

    def restart(spec: launch.SlaveSpec, **kw):
        proc = launch.start(spec, **kw)
        started.append(proc)
        return proc

    make.restart = restart
    try:
        yield make
    finally:
        for p in started:
            p.stop(timeout=10)


@pytest.fixture
def sites():
    """Hosts ``a``, ``b`` (slaves), ``c`` (coordinator) and ``r`` (targets), each
    in its own network namespace on one private bridge (see tests/sites.py)."""
    need_netns()
    from tests.sites import Sites
    with Sites(("a", "b", "c", "r")) as net:
        yield net
