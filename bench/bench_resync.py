"""Failback resync against a full copy and a checksum-based delta copy.

    .venv/bin/python bench/bench_resync.py [--volume-mib 1024] [--dirty-pct 1]

A group of 2 slaves x 2 volumes (s1: a, b; s2: c, d) mirrored to 2
secondaries (r1, r2), every image on /dev/shm, filled with random data (no
zero stretch anybody could skip).  In one run:

  initial     the mirror's first group: a full copy a -> b (untimed in the
              ratios, shown for scale).
  split       --dirty-pct % of the blocks of every volume rewritten at the
              primaries (S: never replicated), the primaries stopped (the
              site is lost), ``cgmirror failover``, then --dirty-pct % of the
              blocks rewritten at the new primaries (T); both scattered at
              random, so S and T overlap by chance only.
  delta       the peer a user would script without change indicators: per
              volume, read both sides whole in 4 MiB chunks (the new
              primary's host export and an ``nbdkit file`` server on a copy
              of the old primary's image, made before the resync, untimed),
              BLAKE2b digest of every 64 KiB block on each side, write the
              blocks whose digests differ; the four volumes in parallel.
  resync      ``cgmirror resync --from b --to a`` (in process, the
              RoleSwitch API the command calls): demote the old primaries
              (started again by their hosts after the failover, each a
              role op and a restart by its supervisor), return their indicators, adopt baselines,
              one group that sends S | T and hardens.
  full        ``cgmirror resync --from b --to a --full`` right after: the
              same command copying every block of the same group (the roles
              are already in place, so it pays no restarts).

Bytes are counted at the receiving end (the secondaries' own
``replication_bytes`` counters).  Afterwards the images of both sites, and
the delta copy's, are compared byte for byte.

Prints a table, then one JSON line last: ratio_vs_full (resync seconds /
full seconds, whole commands), ratio_group_vs_full (the same for only the
group that sends, i.e. without the role switches and the recovery before
it), bytes_vs_union (bytes received / (|S u T| x granularity)),
ratio_vs_delta (resync seconds / delta seconds), ratio_vs_initial_copy
(resync seconds / the initial full copy's: a copy into a target with no
hardened group to keep, so no undo store; ``--full`` keeps the target's
group until it hardens, like any resync, and pays the undo store for every
block), the seconds and bytes of each, the mirror's line of each group, and
the load average at the start and the end (the machine is shared).

Per phase (initial, resync, full) ``fixed_s``: the phase's seconds less its
group's drain, prepare and commit -- what it pays whatever the bytes: role
changes (``roles_s``), the mirror's recovery (``recover_s``), baselines
adopted (``adopt_s``), and inside the group the checks before its cut
(``precut_s``: preflight, lineage, baseline verification) and the freeze
(``coordination_s``); beside them ``drain_s``, ``prepare_s``, ``commit_s``,
``group_bytes`` and ``drain_mb_s`` (group bytes / drain seconds).  What
bounds ratio_group_vs_full: ``group_vs_full_drain``,
``group_vs_full_prepare_commit`` and ``group_vs_full_rest`` (the resync
group's drain, prepare + commit, and the rest, each over the full copy's
group seconds; they add up to ratio_group_vs_full), ``drain_rate_vs_full``
(scattered blocks' drain MB/s over the full copy's),
``ratio_group_at_full_rate`` (the ratio had the scattered blocks drained at
the full copy's rate) and ``bytes_vs_full`` (the floor: bytes over bytes).  Removes its files from /dev/shm.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import peers  # noqa: E402
from coordinator import cli, launch, session as session_mod  # noqa: E402
from coordinator.roles.failover import RoleSwitch  # noqa: E402
from coordinator.link import SlaveLink  # noqa: E402
from coordinator.mirror import Mirror  # noqa: E402

MiB = 1 << 20
G = 64 * 1024                   # the default granularity
CHUNK = 4 * MiB                 # the delta copy's read size
NODES = {"s1": ("a", "b"), "s2": ("c", "d")}          # site a
PEER = {"s1": "r1", "s2": "r2"}                       # site b

SESSION_HEAD = """
[session]
name = "bench"
state_dir = "state"
lease_ms = 10000
max_coordination_ms = 5000
copy_timeout_ms = 600000

[mirror]
interval_ms = 0
max_drain_ms = 600000
rpo_threshold_s = 3600
control = "m.ctl"
"""


def session_text(size: int) -> str:
    out = [SESSION_HEAD]
    for s, vols in NODES.items():
        r = PEER[s]
        out.append(f'[[slave]]\nname = "{s}"\nstate_dir = "{s}"\nnbd_socket = "{s}.sock"\n'
                   f'control = "{s}.ctl"\n')
        for v in vols:
            out.append(f'[[slave.volume]]\nname = "{v}"\npath = "{s}-{v}.img"\n'
                       f'size = {size}\nsecondary = "{r}"\n')
    for s, vols in NODES.items():
        r = PEER[s]
        out.append(f'[[secondary]]\nname = "{r}"\nstate_dir = "{r}"\nnbd_socket = "{r}.sock"\n'
                   f'control = "{r}.ctl"\n')
        for v in vols:
            out.append(f'[[secondary.volume]]\nname = "{v}"\npath = "{r}-{v}.img"\n'
                       f'size = {size}\n')
    return "\n".join(out)


class Nodes:
    """Every node under its supervisor (``launch.start`` detached, as ``cgmirror
    slave|secondary start`` does): a role switch is the node's own op, its
    supervisor starts it again in the new role.  The ``finally`` below stops
    every supervisor started here by its pid."""

    def __init__(self):
        self.procs: dict[str, launch.SlaveProcess] = {}

    def stop(self, spec):
        p = self.procs.pop(spec.name, None)
        if p is not None:
            p.stop()

    def start(self, spec):
        # A node stopped here: its supervisor has exited (stop waits for it).
        self.procs[spec.name] = launch.start(spec, detach=True)

    def stop_all(self):
        for name in list(self.procs):
            self.procs.pop(name).stop(timeout=10)


class TimedSwitch(RoleSwitch):
    """The command's own code, timed in its parts: the role switches (node
    restarts), the mirror's recovery (settles the target, returns its
    indicators), the rest before the group (baselines adopted, lineage
    checked), and the group that sends, with the mirror's own measures of
    that group (``GroupResult.measures``: coordination, hold, drain,
    prepare, commit) and the time before its cut (preflight, lineage and
    baseline checks inside ``run_once``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.t = {"roles": 0.0, "recover": 0.0, "between": 0.0, "group": 0.0,
                  "precut": 0.0}
        self.group = None           # the GroupResult that hardened
        self._recovered = None

    def become(self, node, role):
        t = time.monotonic()
        try:
            return super().become(node, role)
        finally:
            self.t["roles"] += time.monotonic() - t

    def mirror(self, source):
        m = super().mirror(source)
        recover = m.recover

        def timed_recover(*a, **kw):
            t = time.monotonic()
            try:
                return recover(*a, **kw)
            finally:
                self._recovered = time.monotonic()
                self.t["recover"] += self._recovered - t
        m.recover = timed_recover
        return m

    def _harden(self, m, until_clean=False):
        t = time.monotonic()
        if self._recovered is not None:
            self.t["between"] += t - self._recovered
        run_once = m.run_once

        def timed_run_once():
            w0 = time.time()
            res = run_once()
            self.t["precut"] += max(0.0, res.cut - w0) if res.cut else 0.0
            self.group = res
            return res
        m.run_once = timed_run_once
        try:
            return super()._harden(m, until_clean)
        finally:
            self.t["group"] = time.monotonic() - t

    def parts(self, key: str, total: float) -> dict:
        """The phase's fields: its parts, and ``fixed_s``: the command's
        seconds less the group's drain, prepare and commit -- what it pays
        whatever the bytes (role changes, recovery, baseline and lineage
        checks, the freeze)."""
        g = self.group.measures if self.group is not None else {}
        sec = {k: (g.get(f"{k}_ms") or 0.0) / 1000
               for k in ("coordination", "drain", "prepare", "commit")}
        nbytes = self.group.bytes if self.group is not None else 0
        return {f"{key}_roles_s": self.t["roles"], f"{key}_recover_s": self.t["recover"],
                f"{key}_adopt_s": self.t["between"], f"{key}_group_s": self.t["group"],
                f"{key}_precut_s": self.t["precut"],
                **{f"{key}_{k}_s": v for k, v in sec.items()},
                f"{key}_group_bytes": nbytes,
                f"{key}_drain_mb_s": round(nbytes / 1e6 / sec["drain"], 1)
                if sec["drain"] else None,
                f"{key}_fixed_s": total - sec["drain"] - sec["prepare"] - sec["commit"]}


def fill(path: str, size: int, rng: random.Random) -> None:
    """``size`` bytes of random data (a 64 MiB pattern, shifted per MiB so
    that no two MiB of an image are alike)."""
    pattern = rng.randbytes(64 * MiB + MiB)
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            k = (off // MiB * 4099) % (64 * MiB)
            f.write(pattern[k:k + min(MiB, size - off)])


def scatter(uri: str, nblocks: int, count: int, rng: random.Random) -> set[int]:
    """Rewrite ``count`` random blocks through ``uri``; the block numbers."""
    blocks = set(rng.sample(range(nblocks), count))
    h = nbd.NBD()
    h.set_handle_name("scatter")
    h.connect_uri(uri)
    try:
        for b in sorted(blocks):
            h.pwrite(rng.randbytes(G), b * G)
        h.flush()
    finally:
        h.shutdown()
    return blocks


def delta_copy(src_uri: str, dst_uri: str) -> tuple[int, int]:
    """The scripted peer: read both whole, digest every block, write the
    blocks that differ.  Returns (bytes read, bytes written)."""
    src, dst = nbd.NBD(), nbd.NBD()
    src.set_handle_name("delta-src")
    dst.set_handle_name("delta-dst")
    src.connect_uri(src_uri)
    dst.connect_uri(dst_uri)
    read = written = 0
    try:
        size = src.get_size()
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            a, b = src.pread(n, off), dst.pread(n, off)
            read += 2 * n
            for o in range(0, n, G):
                if hashlib.blake2b(a[o:o + G]).digest() != \
                        hashlib.blake2b(b[o:o + G]).digest():
                    dst.pwrite(a[o:o + G], off + o)
                    written += len(a[o:o + G])
        dst.flush()
    finally:
        src.shutdown()
        dst.shutdown()
    return read, written


def differing_blocks(x: str, y: str) -> int:
    """Blocks in which the files ``x`` and ``y`` differ."""
    bad = 0
    with open(x, "rb") as f, open(y, "rb") as g:
        while True:
            a, b = f.read(CHUNK), g.read(CHUNK)
            if not a and not b:
                return bad
            if a != b:
                bad += sum(1 for o in range(0, max(len(a), len(b)), G)
                           if a[o:o + G] != b[o:o + G])


def replication_bytes(spec) -> int:
    """Bytes the node received as a secondary; a primary (the old primaries
    before the resync demotes them) received none."""
    with SlaveLink.from_spec(spec) as lk:
        return sum(v.get("replication_bytes", 0) for v in lk.status()["volumes"].values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume-mib", type=int, default=1024)
    ap.add_argument("--dirty-pct", type=float, default=1.0)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    size = args.volume_mib * MiB
    nblocks = size // G
    count = max(1, round(nblocks * args.dirty_pct / 100))
    rng = random.Random(args.seed)
    d = tempfile.mkdtemp(prefix="cgm-resync-", dir=args.dir)
    path = os.path.join(d, "bench.toml")
    with open(path, "w") as f:
        f.write(session_text(size))
    sess = session_mod.load(path)
    lau = Nodes()
    servers: list[peers.Server] = []
    logs: list[str] = []
    say = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
    load0 = list(os.getloadavg())
    out: dict = {"volumes": sum(len(v) for v in NODES.values()), "volume_bytes": size,
                 "granularity": G, "dirty_blocks_per_side_per_volume": count}
    try:
        t = time.monotonic()
        for s, vols in NODES.items():
            for v in vols:
                fill(os.path.join(d, f"{s}-{v}.img"), size, rng)
        say(f"filled {out['volumes']} x {args.volume_mib} MiB in"
            f" {time.monotonic() - t:.1f} s")
        for cfg in [*sess.slaves, *sess.secondaries]:
            lau.start(cfg.spec())
        m = Mirror(sess, log=logs.append, serve_control=False).open()
        try:
            t = time.monotonic()
            res = m.run_once()
            out["initial_s"] = time.monotonic() - t
            ms = {k: (res.measures.get(f"{k}_ms") or 0.0) / 1000
                  for k in ("drain", "prepare", "commit")}
            out["initial_fixed_s"] = out["initial_s"] - sum(ms.values())
            out["initial_drain_mb_s"] = round(res.bytes / 1e6 / ms["drain"], 1) \
                if ms["drain"] else None
            assert res.outcome == "hardened", (res, logs[-5:])
        finally:
            m.close()
        say(f"initial full copy: {out['initial_s']:.2f} s")

        # The split: S at site a, its primaries gone, failover, T at site b.
        S, T = {}, {}
        for s, vols in NODES.items():
            for v in vols:
                S[v] = scatter(f"nbd+unix:///{v}?socket={d}/{s}.sock", nblocks, count, rng)
        for cfg in sess.slaves:
            lau.stop(cfg.spec())
        assert cli.main(["-s", path, "failover"]) == 0
        for s, vols in NODES.items():
            for v in vols:
                T[v] = scatter(f"nbd+unix:///{v}?socket={d}/{PEER[s]}.sock", nblocks,
                               count, rng)
        # Site a's hosts come back: the old primaries start in the role they
        # recorded (primary), holding S; the resync demotes them.
        for cfg in sess.slaves:
            lau.start(cfg.spec())
        union = sum(len(S[v] | T[v]) for v in S)
        out["union_blocks"] = union
        out["overlap_blocks"] = sum(len(S[v] & T[v]) for v in S)

        # The scripted delta copy onto copies of the old primary's images.
        jobs = []
        for s, vols in NODES.items():
            for v in vols:
                copy = os.path.join(d, f"delta-{v}.img")
                shutil.copyfile(os.path.join(d, f"{s}-{v}.img"), copy)
                srv = peers.nbdkit_file(copy, os.path.join(d, f"delta-{v}.sock"))
                servers.append(srv)
                jobs.append((f"nbd+unix:///{v}?socket={d}/{PEER[s]}.sock", srv.uri))
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            done = list(ex.map(lambda j: delta_copy(*j), jobs))
        out["delta_s"] = time.monotonic() - t
        out["delta_bytes_read"] = sum(r for r, _ in done)
        out["delta_bytes_written"] = sum(w for _, w in done)
        for srv in servers:
            srv.stop()
        say(f"delta copy: {out['delta_s']:.2f} s")

        # The resync, then the full copy of the same group.
        for full in (False, True):
            key = "full" if full else "resync"
            before = sum(replication_bytes(c.spec()) for c in sess.slaves
                         if launch.running_pid(c.spec()))
            rs = TimedSwitch(sess, log=logs.append)
            t = time.monotonic()
            rs.resync("b", "a", full=full)
            out[f"{key}_s"] = time.monotonic() - t
            out.update(rs.parts(key, out[f"{key}_s"]))
            # The mirror's own line: where the group's time went (drain,
            # prepare and commit at the secondaries).
            out[f"{key}_group_line"] = next((line for line in reversed(logs)
                                             if re.match(r"group \d+ hardened", line)), None)
            out[f"{key}_bytes"] = sum(replication_bytes(c.spec())
                                      for c in sess.slaves) - before
            say(f"{key}: {out[f'{key}_s']:.2f} s (roles {out[f'{key}_roles_s']:.2f} s,"
                f" group {out[f'{key}_group_s']:.2f} s, fixed {out[f'{key}_fixed_s']:.2f} s)")
            if not full:
                bad = {v: differing_blocks(os.path.join(d, f"{s}-{v}.img"),
                                           os.path.join(d, f"{PEER[s]}-{v}.img"))
                       for s, vols in NODES.items() for v in vols}
                bad.update({f"delta-{v}": differing_blocks(
                    os.path.join(d, f"delta-{v}.img"), os.path.join(d, f"{PEER[s]}-{v}.img"))
                    for s, vols in NODES.items() for v in vols})
                out["differing_blocks_after"] = sum(bad.values())
                for v in S:
                    os.unlink(os.path.join(d, f"delta-{v}.img"))
    finally:
        for srv in servers:
            srv.stop()
        lau.stop_all()
        shutil.rmtree(d, ignore_errors=True)

    out["ratio_vs_full"] = round(out["resync_s"] / out["full_s"], 4)
    out["ratio_group_vs_full"] = round(out["resync_group_s"] / out["full_group_s"], 4)
    # What bounds ratio_group_vs_full: the resync group's seconds split into
    # its parts, each over the full copy's group seconds (they add up to
    # ratio_group_vs_full); the ratio had the scattered blocks drained at
    # the full copy's rate; and the floor, bytes sent over bytes sent.
    fg = out["full_group_s"]
    drain, pc = out["resync_drain_s"], out["resync_prepare_s"] + out["resync_commit_s"]
    out["group_vs_full_drain"] = round(drain / fg, 4)
    out["group_vs_full_prepare_commit"] = round(pc / fg, 4)
    out["group_vs_full_rest"] = round((out["resync_group_s"] - drain - pc) / fg, 4)
    if out["full_drain_mb_s"]:
        out["drain_rate_vs_full"] = round((out["resync_drain_mb_s"] or 0)
                                          / out["full_drain_mb_s"], 3)
        out["ratio_group_at_full_rate"] = round(
            (out["resync_group_s"] - drain
             + out["resync_group_bytes"] / 1e6 / out["full_drain_mb_s"]) / fg, 4)
    out["bytes_vs_full"] = round(out["resync_group_bytes"] / out["full_group_bytes"], 4) \
        if out["full_group_bytes"] else None
    out["bytes_vs_union"] = out["resync_bytes"] / (out["union_blocks"] * G)
    out["ratio_vs_delta"] = round(out["resync_s"] / out["delta_s"], 4)
    out["ratio_vs_initial_copy"] = round(out["resync_s"] / out["initial_s"], 4)
    out["loadavg_start"] = load0
    out["loadavg"] = list(os.getloadavg())
    rows = [("initial full copy (group 1)", out["initial_s"], None, None),
            ("delta copy (reads both sides)", out["delta_s"], out["delta_bytes_written"],
             out["delta_bytes_read"]),
            *[row for key, name in (("resync", "cgmirror resync"),
                                    ("full", "cgmirror resync --full"))
              for row in ((name, out[f"{key}_s"], out[f"{key}_bytes"], None),
                          ("  fixed (not drain/prepare/commit)", out[f"{key}_fixed_s"],
                           None, None),
                          ("  role switches", out[f"{key}_roles_s"], None, None),
                          ("  recovery", out[f"{key}_recover_s"], None, None),
                          ("  baselines adopted", out[f"{key}_adopt_s"], None, None),
                          ("  the group", out[f"{key}_group_s"], None, None),
                          ("    before its cut (checks)", out[f"{key}_precut_s"], None, None),
                          ("    coordination", out[f"{key}_coordination_s"], None, None),
                          ("    drain", out[f"{key}_drain_s"], out[f"{key}_group_bytes"],
                           None),
                          ("    prepare", out[f"{key}_prepare_s"], None, None),
                          ("    commit", out[f"{key}_commit_s"], None, None))]]
    print(f"{'':34} {'seconds':>8} {'MiB sent':>9} {'MiB read':>9}")
    for name, s, sent, read in rows:
        print(f"{name:34} {s:8.2f} {'' if sent is None else f'{sent / MiB:9.1f}':>9}"
              f" {'' if read is None else f'{read / MiB:9.0f}':>9}")
    for key in ("resync", "full"):
        print(f"{key}: {out[f'{key}_group_line']}")
    print(f"drain MB/s: resync {out['resync_drain_mb_s']}, full {out['full_drain_mb_s']};"
          f" ratio_group_vs_full {out['ratio_group_vs_full']} = drain"
          f" {out['group_vs_full_drain']} + prepare/commit"
          f" {out['group_vs_full_prepare_commit']} + rest {out['group_vs_full_rest']};"
          f" at the full copy's drain rate {out.get('ratio_group_at_full_rate')};"
          f" bytes_vs_full {out['bytes_vs_full']}")
    print(f"|S u T| = {out['union_blocks']} blocks ({out['overlap_blocks']} in both);"
          f" blocks differing afterwards: {out['differing_blocks_after']}")
    print(json.dumps(out))
    return 0 if out["differing_blocks_after"] == 0 and out["bytes_vs_union"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
