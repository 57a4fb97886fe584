"""Power loss under the mirror: a site's state directories on a LazyFS
(tests/lazyfs.py) forget every unsynced write at a random moment of the
cycle, and every process of that site dies with them.  The only test of
the fsync ordering of the secondary's undo store and group record under
the mirror (tests/test_power_loss.py tests the primary's change map alone).

The rig and the reader are the fault campaign's (tests/soak_mirror.py): the
remote host exports are read as one group and checked all through.  As
there, the volumes stay on a normal directory: every data write a process
issued survives, even one issued after the cut (a disk may write back any
issued block), so the undo store must be durable *before* the live block
is overwritten, and a change bit before the data write is issued.

The invariant, per power cut at the remote site (r1, r2 and the
coordinator lose power; their state directories keep only what was synced):

  Let H be the highest group any secondary reported hardened at the moment
  of the cut (a commit it acknowledged).  After reboot, the durable records
  hold a group g >= H that recovery can reach on every secondary: the
  highest durable "hardened" is >= H, and every secondary below it has that
  group durably "prepared" (so it rolls forward; a rollback to a lower group
  would lose a hardened group).  Once restarted, recovery brings both to one
  group >= H, every read of the host exports as a group passes the
  dependent-write checker, and mirroring resumes.

Per power cut at the primary site (s1, s2 and the coordinator): the remote
stays consistent and never moves back below H; mirroring resumes; and once
the writers stop and the mirror catches up, the remote equals the primaries
byte for byte: no change the primaries acknowledged was forgotten by their
change maps (invariant C1 through the whole mirror), without the mirror
choosing a full copy.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

import soak_mirror
from cgtest import need, soak
from cgtest import lazyfs_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

# `make soak` (cgtest.soak): up to 8 cuts in 40 s; `make test`: up to 4 in
# 15 s.  Never fewer than MIN_CUTS, whatever the budget (a loaded machine).
BUDGET_S = soak(15.0, 40.0)
MAX_CUTS = soak(4, 8)
MIN_CUTS = 3
SITES = {"remote": ("r1", "r2"), "primary": ("s1", "s2")}


def durable_groups(mountpoint: str) -> dict[str, tuple[int, int | None]]:
    """(hardened, prepared) each secondary's durable record holds."""
    out = {}
    for r in SITES["remote"]:
        with open(os.path.join(mountpoint, r, "secondary.json")) as f:
            st = json.load(f)
        out[r] = (st["hardened"], st["prepared"])
    return out


@pytest.mark.parametrize("site", ["remote", "primary"])
def test_power_cut_keeps_the_last_hardened_group(run_dir, site):
    """Power cuts at random moments of the cycle (see the module doc for
    the invariant): no hardened group lost, the remote always consistent,
    mirroring resumes, and at the end the remote equals the primaries."""
    need("nbdkit")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"seed {seed}")
    nodes = SITES[site]
    with lazyfs_at(os.path.join(run_dir, "lazy"), survive=0.5) as fs:
        for n in nodes:
            os.makedirs(os.path.join(fs.mountpoint, n))
        fs.sync()                       # the state directories exist since installation
        c = soak_mirror.Campaign(run_dir, seed, state_on=fs.mountpoint, nodes_on=nodes,
                                 full_disk=False)
        cuts = armed = rolled_forward = 0
        try:
            c.start()
            t0 = time.monotonic()
            while cuts < MIN_CUTS or (cuts < MAX_CUTS
                                      and time.monotonic() - t0 < BUDGET_S):
                fs.set_survive(rng.choice((0.0, 0.5)))
                time.sleep(rng.uniform(0.1, 1.2))      # anywhere in a cycle
                if rng.random() < 0.5:
                    armed += 1                          # inside a write/sync sequence
                    fs.arm(after=rng.randrange(0, 30))
                    if not fs.wait_cut(timeout=10):
                        fs.power_cut()
                else:
                    fs.power_cut()
                # What the secondaries acknowledged up to the cut (no commit
                # can succeed on the dead disk after it).
                h = max(c.hardened(quiet=True))
                if site == "primary":
                    c.stop_work()       # its writes would fail on the dead slaves
                for n in nodes:
                    c.kill_node(n)
                c.kill_mirror()
                cuts += 1
                fs.reboot()
                if site == "remote":
                    rec = durable_groups(fs.mountpoint)
                    g = max(hh for hh, _ in rec.values())
                    assert g >= h, f"seed {seed}: group {h} was hardened, the records" \
                                   f" after the cut hold {rec}"
                    for r, (hh, p) in rec.items():
                        assert hh == g or p == g, f"seed {seed}: {r} holds {(hh, p)}," \
                            f" cannot reach group {g}: {rec}"
                        rolled_forward += hh < g
                for n in nodes:
                    c.start_node(n)
                if site == "primary":
                    c.start_work()
                c.heal()
                soak_mirror.wait_for(lambda: min(c.hardened(quiet=True)) >= max(h, 1) + 1,
                                  120, f"mirroring to resume after power cut {cuts}")
                c.read_one_group(f"the remote read as one group after power cut {cuts}")
                assert c.counts["violations"] == 0, c.violations
            # Writers stopped and two more groups: the remote is complete.
            c.stop_work()
            top = max(c.hardened())
            soak_mirror.wait_for(lambda: min(c.hardened(quiet=True)) >= top + 2, 60,
                              "the last groups")
            c.assert_equal()
            out = c.report(time.monotonic() - t0)
        finally:
            c.close()
    print(f"\npower loss under the mirror ({site} site): cuts={cuts} armed={armed}"
          f" rolled_forward={rolled_forward} groups_checked={out['groups_checked']}"
          f" violations={out['violations']}"
          f" seed={seed}")
    assert cuts >= MIN_CUTS and out["violations"] == 0 and out["groups_checked"] >= cuts
    assert not [x for x in out["heavy_groups"] if "full copy" in x], out["heavy_groups"]
