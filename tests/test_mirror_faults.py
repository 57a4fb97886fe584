"""A bounded slice of the mirror's fault campaign (tests/soak_mirror.py;
the full one is `make soak`): every kind of fault once, at a random
moment, while dependent writes run and the remote is read as a group.

Nothing may be seen that the checker refuses, mirroring must resume after
each fault without a full copy, and no host write may wait past the lease.
"""

from __future__ import annotations

import os

import pytest

from cgtest import need
import soak_mirror

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_every_fault_once_keeps_the_remote_consistent(run_dir):
    """One round of each fault kind: 0 violations, no full copy, groups
    checked while forming, writes never held to the lease."""
    need("nbdkit")
    if os.geteuid() != 0:
        pytest.skip("the full-disk fault mounts a tmpfs: needs root")
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")               # `python tests/soak_mirror.py --seed N` replays it
    out = soak_mirror.campaign(run_dir, rounds=len(soak_mirror.KINDS), budget_s=150,
                               seed=seed)
    print(out)
    assert out["violations"] == 0, out["violation_lines"]
    assert out["full_copies"] == 0, out["heavy_groups"]
    assert out["faults"] == len(soak_mirror.KINDS), out
    assert set(out["by_kind"]) == set(soak_mirror.KINDS), out
    assert out["groups_checked"] >= out["faults"], out
    assert out["groups_formed"] >= 2 * out["faults"], out
    assert out["max_write_s"] < out["lease_s"], out


SITE_KINDS = ("cut-link", "slow-link", "kill-slave", "kill-coordinator")


def test_link_faults_across_sites_keep_the_remote_consistent(run_dir):
    """The primaries in namespaces over TCP+TLS (SitesCampaign): a cut and
    a slow link between the coordinator and a primary, kills of a primary
    and of the coordinator; the same guarantees."""
    need("nbdkit")
    from cgtest import need_netns
    need_netns()
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    out = soak_mirror.campaign(run_dir, rounds=len(SITE_KINDS), budget_s=120, seed=seed,
                               sites=True, kinds=SITE_KINDS)
    print(out)
    assert out["violations"] == 0, out["violation_lines"]
    assert out["full_copies"] == 0, out["heavy_groups"]
    assert set(out["by_kind"]) == set(SITE_KINDS), out
    assert out["groups_checked"] >= out["faults"], out
    # The writers run in site c: a cut stalls them for its length (<= 3 s),
    # which is not a gate held; the bound is still the lease.
    assert out["max_write_s"] < out["lease_s"], out
