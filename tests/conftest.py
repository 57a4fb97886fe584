"""Shared fixtures: real slaves (nbdkit + plugin) in a private directory.

Plain helpers (``need``, ``wait_until``, ``closing_all``...) live in
tests/cgtest.py: test modules import them from there, never from here.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cgtest import need, need_netns, short_dir  # noqa: E402
from coordinator import launch  # noqa: E402

pytest_plugins = ["vmfixture", "tlsrig"]

# Hypothesis's 200 ms deadline per example measures the machine, not the
# code: on a loaded 2-core host a pure example took longer and failed.
settings.register_profile("cgmirror", deadline=None)
settings.load_profile("cgmirror")


@pytest.fixture
def run_dir():
    """A short directory for unix sockets (sun_path is limited to 108 bytes)
    that a child of another uid can reach; removed at the end (see
    ``cgtest.short_dir``)."""
    with short_dir() as d:
        yield d


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
    in its own network namespace on one private bridge (see harness/sites.py)."""
    need_netns()
    from harness.sites import Sites
    with Sites(("a", "b", "c", "r")) as net:
        yield net
