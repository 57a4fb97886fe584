"""README's "Two hosts" walkthrough, run as written on the host rig
(harness/hosts.py): hosts a1 (site a), b1 (site b) and c (the mirror's),
each a network namespace with its own /etc, /var/lib and /run, at the
addresses the README names (10.0.0.1-3 on the rig's private bridge).

Every block of the walkthrough is marked by an HTML comment before it::

    <!-- walkthrough HOST: STEP [PATH] -->

HOST is a1, b1, c or ``every``; a ``sh`` block runs on that host line by
line (a login shell's ``/etc/profile.d`` read first), each line exiting 0
unless its comment says ``# exits N: "TEXT"`` (then N, and TEXT in its
output); a block with a PATH (the session file) is written there.  The
test runs the blocks in the README's order and knows them by STEP: it
fails if one it expects is missing or one it does not know appears, so
the README cannot drift from what works.  Three things a real site does
are the rig's (say so in the README): the install (the hosts share this
machine's installation: the venv is on PATH), ``scp HOST:DIR/`` (a tar
from one host's namespaces into the other's) and ``systemctl`` (the links
``enable`` makes and a reload of the host's supervisor, which runs the
units as systemd does; ``stop``/``start`` are ``disable``/``enable``
with ``--now``, the process-level effect).

Between the blocks the test does what the sites' users do: the
dependent-write workload (harness/workload.py) writes on the primary's
exports from inside the primary's host, and the checker reads every image
a user would read (a primary's exports, a secondary's read-only host
export showing its last hardened group), from inside that host, with its
certificate.  Planned switchover from c and back from b1, a DR test round
trip from c and from b1, a disaster (site a cut off from everything while
a1 keeps taking writes, failover on b1, writes at b, a back: split,
resync naming b with the loser's blocks kept, switch back to a).

Run as ``python tests/test_walkthrough.py write|check|phase ...`` inside
a host, it is the workload, the checker, or a look at a primary's phase
(``main``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

README = os.path.join(ROOT, "README.md")
SUBNET = "10.0.0.0/24"              # a1 .1, b1 .2, c .3: the README's addresses
HOSTS = ("a1", "b1", "c")
VOLS = ("db", "logs")
SIZE = 64 << 20
NBD_PORT = 10809
RECORDS = 60                        # per writer, per burst of host writes
BLOCK = re.compile(r"<!-- walkthrough (\S+): (\S+)(?: (\S+))? -->\n```(\w+)\n(.*?)```",
                   re.S)
EXITS = re.compile(r'\s+#\s*exits (\d+): "([^"]*)"\s*$')
COMMENT = re.compile(r"\s+#\s.*$")

# The blocks the walkthrough must have, in order: (host, step).
STEPS = [("every", "dirs"), ("c", "session"), ("c", "pki"), ("a1", "node"),
         ("b1", "node"), ("c", "mirror"), ("c", "switchover"), ("c", "stop"),
         ("b1", "switchback"), ("c", "start"), ("c", "drtest"), ("c", "drtest-end"),
         ("c", "stop-2"), ("b1", "drtest"), ("b1", "drtest-end"), ("c", "start-2"),
         ("b1", "failover"), ("c", "comeback")]


def layout():
    from harness import workload as wl
    return wl.Layout(tuple(f"a1/{v}" for v in VOLS), SIZE)


def uris(addr: str) -> list[str]:
    return [f"nbds://{addr}:{NBD_PORT}/{v}" for v in VOLS]


# ------------------------------------------------------------ inside a host

def main(argv: list[str]) -> int:
    """``write TLSDIR URI...`` (resume the run the images hold, RECORDS per
    writer) or ``check TLSDIR URI...`` (prints the heads as JSON), or
    ``phase TLSDIR CONTROL`` (a node's phase and cut)."""
    what, tls_dir, targets = argv[0], argv[1], argv[2:]
    if what == "phase":
        from coordinator.control import ControlClient
        from wire import tls
        ctx = tls.HostFiles(tls_dir).client_context()
        st = ControlClient(targets[0], 30, ctx).call("status")
        print(json.dumps({"phase": st["phase"], "n": st["n"]}))
        return 0
    from harness import workload as wl
    wl.TLS_DIR = tls_dir
    if what == "check":
        rep = wl.check_targets(targets, layout())
        print(json.dumps({"ok": rep.ok, "heads": rep.heads, "summary": rep.summary()}))
        return 0 if rep.ok else 1
    w = wl.Workload.resume(targets, layout(), max_records=RECORDS - 1).start()
    for t in w._threads:
        t.join(120)
    w.stop()
    if w.errors:
        print(f"write errors: {w.errors}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "heads": w.acked}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------ the test

import pytest  # noqa: E402

from cgtest import need, need_netns, wait_until  # noqa: E402


def blocks() -> list[tuple[str, str, str | None, str, str]]:
    """(host, step, path, language, body) of every marked block of
    README.md, in order."""
    with open(README) as f:
        return [m.groups() for m in BLOCK.finditer(f.read())]


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def lines(body: str) -> list[str]:
    """Logical lines: continuations joined, blank and comment lines gone."""
    out, pending = [], ""
    for raw in body.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_the_walkthrough_blocks_are_found():
    """Every block the walkthrough needs is in README.md, marked, in order,
    and no marked block is one the test does not run."""
    found = [(h, s) for h, s, _, _, _ in blocks()]
    assert found == STEPS


def test_lines_and_their_expected_exits_are_read_as_written():
    """Continuations join, comment lines go, a trailing ``# exits N: "TEXT"``
    is the line's expectation, any other trailing comment is not."""
    body = ('# a comment\ncgmirror pki issue a1 \\\n    --ip 10.0.0.1\n\n'
            'cgmirror status   # exits 1: "split: site b"\ncgmirror check  # checks\n')
    got = lines(body)
    assert got == ["cgmirror pki issue a1  --ip 10.0.0.1",
                   'cgmirror status   # exits 1: "split: site b"',
                   "cgmirror check  # checks"]
    m = EXITS.search(got[1])
    assert (m.group(1), m.group(2)) == ("1", "split: site b")
    assert EXITS.search(got[2]) is None and COMMENT.sub("", got[2]) == "cgmirror check"


class Walk:
    """The rig, and a shell per host as a root login on it."""

    def __init__(self, rig):
        self.h = rig
        self.env = {k: v for k, v in os.environ.items() if k != "CGMIRROR_SESSION"}
        from harness.hosts import UNIT_PATH
        self.env["CGMIRROR_DEBUG"] = "1"       # a bug shows its traceback
        self.env["PATH"] = f"{os.path.dirname(sys.executable)}:{UNIT_PATH}"

    # -- the README's lines

    def block(self, host: str, step: str) -> None:
        for h, s, path, lang, body in blocks():
            if (h, s) != (host, step):
                continue
            names = HOSTS if host == "every" else (host,)
            for name in names:
                if path:
                    self.h[name].run(["sh", "-c", f"cat > {path}"], input=body,
                                     env=self.env)
                    continue
                assert lang == "sh", (host, step, lang)
                for line in lines(body):
                    self.line(name, line)
            return
        raise AssertionError(f"no block {host}: {step} in README.md")

    def line(self, host: str, line: str) -> None:
        want, text = 0, None
        m = EXITS.search(line)
        if m:
            want, text = int(m.group(1)), m.group(2)
            line = line[:m.start()]
        line = COMMENT.sub("", line).strip()
        argv = line.split()
        if argv[0] == "systemctl":
            return self.systemctl(host, argv[1:])
        if argv[0] == "scp":
            return self.scp(host, argv[1:])
        r = self.h[host].run(
            ["sh", "-c", "[ -r /etc/profile.d/cgmirror.sh ] && . /etc/profile.d/cgmirror.sh;"
             f" {line}"], check=False, env=self.env, timeout=300)
        said = r.stdout + r.stderr
        assert r.returncode == want, f"on {host}: {line}: exit {r.returncode}: {said}"
        if text is not None:
            assert text in said, f"on {host}: {line}: {text!r} not in: {said}"

    def systemctl(self, host: str, args: list[str]) -> None:
        """What systemd does with the units (the rig's supervisor)."""
        h = self.h[host]
        if args == ["daemon-reload"]:
            os.kill(h.init.pid, signal.SIGHUP)
            return
        if args[0] == "enable":
            assert args[1] == "--now", args
            verb, units = "start", args[2:]
        else:
            verb, units = args[0], args[1:]
        units = [u if u.endswith(".service") else f"{u}.service" for u in units]
        if verb == "start":
            h.enable(*units)
            for u in units:
                h.wait_unit(u, timeout=120)
        elif verb == "stop":
            h.disable(*units)
            for u in units:
                deadline = time.monotonic() + 120
                while h.unit(u) is not None:
                    assert time.monotonic() < deadline, f"{u} did not stop on {host}"
                    time.sleep(0.1)
        else:
            raise AssertionError(f"systemctl {' '.join(args)}: not known to the rig")

    def scp(self, host: str, args: list[str]) -> None:
        """``scp [-rp] SRC... HOST:DIR/``: a tar from this host into that one."""
        args = [a for a in args if not a.startswith("-")]
        dest_host, _, dest = args[-1].partition(":")
        assert dest.endswith("/"), f"scp to {args[-1]}: the walkthrough copies into a dir"
        for src in args[:-1]:
            tar = self.h[host].run(["tar", "-C", os.path.dirname(src), "-cf", "-",
                                    os.path.basename(src)], text=False)
            self.h[dest_host].run(["tar", "-C", dest, "-xpf", "-"], input=tar.stdout,
                                  text=False)

    # -- the sites' users

    def _io(self, what: str, host: str, addr_of: str) -> list[int]:
        cert = f"/etc/cgmirror/pki/{'coordinator' if host == 'c' else host}"
        r = self.h[host].python(os.path.abspath(__file__), what, cert,
                                *uris(self.h[addr_of].addr), timeout=300)
        assert r.returncode == 0, f"{what} on {addr_of} from {host}: {r.stdout} {r.stderr}"
        return json.loads(r.stdout)["heads"]

    def write(self, node: str) -> list[int]:
        """Host writes on ``node``'s exports, from inside its host."""
        return self._io("write", node, node)

    def check(self, node: str) -> list[int]:
        """The checker on ``node``'s images as a user there reads them."""
        return self._io("check", node, node)

    def phase(self, node: str) -> str:
        """The phase of primary ``node`` (idle, frozen, copying ...), asked
        from inside its host with its own certificate."""
        r = self.h[node].python(os.path.abspath(__file__), "phase",
                                f"/etc/cgmirror/pki/{node}",
                                f"tcp:{self.h[node].addr}:7001", timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["phase"]

    def hardened(self) -> int:
        r = self.h["c"].cgmirror("mirror", "status", "--json")
        return json.loads(r.stdout).get("hardened") or 0

    def settled(self, timeout: float = 120) -> int:
        """Wait for a group cut after now to harden (two past the one
        hardened now: the next may have been cut before)."""
        n = self.hardened()
        deadline = time.monotonic() + timeout
        while (got := self.hardened()) < n + 2:
            if time.monotonic() > deadline:
                doc = self.h["c"].cgmirror("mirror", "status").stdout
                raise AssertionError(f"no group past {n + 1} in {timeout} s: {doc}")
            time.sleep(0.2)
        return got


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_hosts_walkthrough(tmp_path):
    """README's walkthrough, block by block on the hosts it names: set-up,
    switchover from c and back from b1, DR tests from c and from b1, a
    disaster and site a's return; no image a user reads ever fails the
    dependent-write checker, and none loses an acknowledged write that
    the commands did not say they overwrite."""
    need("nbdkit", "unshare", "nsenter", "tar")
    need_netns()
    from harness.hosts import Hosts
    with Hosts(str(tmp_path / "rig"), names=HOSTS, subnet=SUBNET, session="prod") as rig:
        assert [rig[n].addr for n in HOSTS] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        rig.boot()
        w = Walk(rig)
        for host, step in STEPS[:6]:
            w.block(host, step)

        # Mirroring a -> b: b1's read-only export holds a's writes once a
        # group cut after them hardens.
        heads = w.write("a1")
        w.settled()
        assert w.check("b1") == heads

        # Planned switchover from c: nothing lost, b1 takes writes, a1 is
        # their remote.
        w.block("c", "switchover")
        assert w.check("b1") == heads
        heads = w.write("b1")
        w.settled()
        assert w.check("a1") == heads

        # ... and back, from b1 (the mirror on c stopped meanwhile).
        w.block("c", "stop")
        w.block("b1", "switchback")
        assert w.check("a1") == heads
        w.block("c", "start")
        heads = w.write("a1")
        w.settled()
        assert w.check("b1") == heads

        # DR test from c: b1 writable at a's hardened group, a keeps writing;
        # the end throws b's test writes away.
        w.block("c", "drtest")
        assert w.check("b1") == heads
        w.write("b1")
        heads = w.write("a1")
        w.block("c", "drtest-end")
        w.settled()
        assert w.check("b1") == heads

        # DR test from b1 (the mirror on c stopped first).
        w.block("c", "stop-2")
        w.block("b1", "drtest")
        assert w.check("b1") == heads
        w.write("b1")
        w.block("b1", "drtest-end")
        assert w.check("b1") == heads
        w.block("c", "start-2")
        heads = w.write("a1")
        w.settled()
        assert w.check("b1") == heads

        # Disaster: site a cut off from everything.  a1 keeps serving its
        # host (its writes are "ahead"); failover on b1 promotes b1 at the
        # last hardened group, which then takes writes of its own.
        # The cut comes between two groups (the mirror stopped for it, and
        # started again once site a is gone): a primary cut off in the
        # middle of a drain stays "copying" past its copy timeout, and its
        # role op refuses until that ends (reported).
        w.systemctl("c", ["stop", "cgmirror-mirror@prod"])
        wait_until(lambda: w.phase("a1") == "idle", 60, "a1 between two groups")
        rig.isolate("a")
        w.systemctl("c", ["start", "cgmirror-mirror@prod"])
        ahead = w.write("a1")
        assert ahead != heads
        w.block("b1", "failover")
        assert w.check("b1") == heads
        # The mirror on c reads the direction from the nodes: it forms no
        # group, and says why (its journal).
        journal = rig["c"].journal("cgmirror-mirror@prod.service")
        wait_until(lambda: "took over from site a (failover): no group forms"
                   in read(journal), 60, "the mirror on c to see the failover")
        b_heads = w.write("b1")
        # a1, cut off, is still the primary it recorded, with every write
        # it acknowledged.  (Not rebooted here: on the rig a reboot mounts
        # /var/lib anew, with another st_dev, and the node takes its files
        # for replaced ones -- nbdplugin/noderecord.py's identity.)
        with open(rig["a1"].file("/var/lib/cgmirror/a1/node.json")) as f:
            assert json.load(f)["role"] == "primary"
        assert w.check("a1") == ahead

        # Site a back: split; b named the winner, a's blocks kept; back to a.
        rig.rejoin("a")
        assert w.check("a1") == ahead
        before = {}
        for v in VOLS:
            with open(rig["a1"].file(f"/var/lib/cgmirror/images/a1-{v}.img"), "rb") as f:
                before[v] = f.read()
        w.block("c", "comeback")
        assert w.check("a1") == b_heads
        kept = 0
        for v in VOLS:
            with open(rig["c"].file(f"/var/lib/cgmirror/kept/a1-{v}.runs.json")) as f:
                runs = json.load(f)["bytes"]
            with open(rig["c"].file(f"/var/lib/cgmirror/kept/a1-{v}.img"), "rb") as f:
                img = f.read()
            for off, n in runs:
                assert img[off:off + n] == before[v][off:off + n], (v, off)
                kept += n
        assert kept > 0
        heads = w.write("a1")
        w.settled()
        assert w.check("b1") == heads
