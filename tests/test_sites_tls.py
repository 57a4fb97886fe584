"""Across network namespaces over TCP with mutual TLS (tests/twosites.py):
slaves in ``a`` and ``b``, the coordinator in ``c``, targets in ``r``.

Ports of two tests of tests/test_consistency.py: copies taken during
dependent writes pass the checker, and a slave killed -9 during the
establish leaves the other thawed within the coordination time.
"""

from __future__ import annotations

import pytest

import twosites

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def two(sites, tmp_path):
    from cgtest import need
    need("nbdkit")
    return twosites.TwoSites(sites, str(tmp_path))


def test_copies_during_dependent_writes_are_consistent_across_sites(two):
    out = two.drive("consistency", two.session_path)
    print(out)
    assert out["ok"] and out["copies"] >= 2, out
    assert all(h >= 0 for h in out["heads"]), out


def test_slave_killed_during_establish_across_sites(two):
    victim = two.procs["s2"]
    out = two.drive("kill", two.session_path, str(victim.pid))
    print(out)
    assert victim.wait(30) != 0          # reaped: it was ours
    assert out["slave"] == "s2" and out["aborts"].get("s1") == "aborted", out
    # Thawed by the abort as soon as s2 died, not at the coordination time
    # (20 s; a busy machine gets half of it).
    limit = twosites.KILL_COORD_MS / 2000
    assert out["abort_after_kill_s"] < limit and out["write_after_kill_s"] < limit, out
    assert out["s1"] == {"phase": "idle", "ended": "aborted", "gates": ["open"]}, out
