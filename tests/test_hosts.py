"""The host rig (harness/hosts.py): hosts a1 a2 (primaries), b1 b2
(secondaries) and c (coordinator), each a network namespace with its own
/etc, /var/lib and /run, and a supervisor that runs cgmirror's units as
systemd does.  The rig's own rules first (systemd's restart table, unit
parsing), without namespaces; then the rig: nodes come up under their units,
`cgmirror` in c forms groups across them over mutual TLS, a node killed -9
is restarted by its unit, a rebooted host brings its node back in its
recorded role, a role change's exit 75 is a restart, and the unit the
supervisor runs is exactly the one install-units wrote and systemd accepts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cgtest import IN_CI, need, need_netns, wait_until
from harness import hosts as hostmod
from harness.hosts import Hosts, HostError, Unit, session_text, should_restart
from wire import protocol

UNIT = """
[Unit]
Description=x %i
StartLimitBurst=3

[Service]
Type=notify
ExecStart=-/bin/prog -s '/etc/a b.toml' node exec %i \\
    --name=%n %%
Restart=on-failure
RestartSec=1min 30s
RestartForceExitStatus=75 SIGUSR1
RestartPreventExitStatus=3
"""


@pytest.fixture
def unit(tmp_path):
    p = tmp_path / "x@.service"
    p.write_text(UNIT)
    return Unit("x@a1.service", str(p))


def test_unit_file_read_as_systemd_reads_it(unit):
    """ExecStart: prefix, quotes, continuation and specifiers; the restart
    keys, the start limit and the time span as written."""
    assert unit.argv == ["/bin/prog", "-s", "/etc/a b.toml", "node", "exec", "a1",
                         "--name=x@a1.service", "%"]
    assert unit.ignore_failure and unit.type == "notify" and unit.notify_access == "main"
    assert (unit.restart, unit.restart_sec, unit.burst) == ("on-failure", 90.0, 3)
    assert unit.force == {75, signal.SIGUSR1} and unit.prevent == {3}


@pytest.mark.parametrize("restart, returncode, expected", [
    ("on-failure", 0, False), ("on-failure", 1, True), ("on-failure", -9, True),
    ("on-failure", -15, False), ("on-failure", 3, False),          # prevented
    ("no", 75, True), ("no", -signal.SIGUSR1, True),                # forced
    ("no", 1, False), ("always", 0, True), ("on-success", 0, True),
    ("on-success", 1, False), ("on-abnormal", -9, True), ("on-abnormal", 1, False),
    ("on-abort", -6, True), ("on-abort", -15, False),
])
def test_should_restart_follows_systemds_table(unit, restart, returncode, expected):
    """systemd.service(5)'s table, Restart(Force|Prevent)ExitStatus= first."""
    unit.restart = restart
    assert should_restart(unit, returncode) is expected


def test_a_stop_asked_for_never_restarts(unit):
    unit.stopping = True
    assert not should_restart(unit, 75)


def test_bad_unit_values_are_one_line(tmp_path):
    p = tmp_path / "y@.service"
    p.write_text("[Service]\nExecStart=/bin/true\nRestart=sometimes\n")
    with pytest.raises(HostError, match=r"Restart=sometimes is not one of no, always"):
        Unit("y@a.service", str(p))
    with pytest.raises(HostError, match="time span '5 parsecs'"):
        hostmod.seconds("5 parsecs")
    p.write_text("[Service]\nExecStart=/bin/x %b\n")
    with pytest.raises(HostError, match="specifier %b is not supported"):
        Unit("y@a.service", str(p))


# ------------------------------------------------------------------ the rig

NODES = ("a1", "a2", "b1", "b2")


def node_unit(name: str) -> str:
    return f"cgmirror-node@{name}.service"


def hardened(c) -> int:
    doc = c.cgmirror_json("mirror", "status")
    return doc.get("hardened") or 0


def wait_group_after(c, n: int, timeout: float = 120) -> int:
    """Wait until the mirror in c has hardened a group past ``n``."""
    got = n
    deadline = time.monotonic() + timeout

    def newer():
        nonlocal got
        got = hardened(c)
        return got > n
    while not newer():
        if time.monotonic() > deadline:
            raise AssertionError(f"no group hardened past {n} in {timeout} s:"
                                 f" {c.cgmirror('mirror', 'status').stdout}")
        time.sleep(0.2)
    return got


def status_pids(c) -> dict[str, tuple]:
    doc = c.cgmirror_json("status")
    nodes = {**doc["slaves"], **doc["secondaries"]}
    return {n: (nodes[n]["pid"], nodes[n]["role"]) for n in nodes}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_under_their_units_form_groups_and_come_back(tmp_path):
    """The session's nodes come up under their host's supervisor on a1 a2
    b1 b2 (over TCP with mutual TLS), the mirror unit in c hardens groups
    across them; a node killed -9 is restarted by its unit, a rebooted host
    brings its node back in its recorded role, and groups form again each
    time, also after a cut between the sites heals and after a reboot while
    the site was cut off; a role change (exit 75) is restarted at once by
    the unit."""
    need("nbdkit", "unshare", "nsenter")
    need_netns()
    with Hosts(str(tmp_path)) as h:
        # Short drains: a cut link fails the group in seconds.
        h.install(session_text(h, mirror={"max_drain_ms": 4000}, copy_timeout_ms=4000))
        h.boot()
        h.enable_nodes()
        c = h["c"]
        pids = status_pids(c)
        for n in NODES:
            assert pids[n] == (h[n].unit(node_unit(n))["pid"],
                               "primary" if n.startswith("a") else "secondary"), n
        # The mirror as a unit in c, like the nodes.
        assert c.cgmirror("install-units").returncode == 0
        c.enable("cgmirror-mirror@h.service")
        c.wait_unit("cgmirror-mirror@h.service")
        n0 = wait_group_after(c, 0)
        # cgmirror at site b sees the same nodes as the coordinator in c.
        assert status_pids(h["b1"]) == status_pids(c)

        # kill -9 of a node: its unit restarts it (Restart=on-failure).
        killed = h["a1"].kill_unit(node_unit("a1"))
        u = h["a1"].wait_unit(node_unit("a1"), not_pid=killed)
        assert u["exits"] == [-signal.SIGKILL] and u["starts"] == 2
        wait_until(lambda: status_pids(c)["a1"] == (u["pid"], "primary"), 60,
                   "c to see a1's new node")
        n1 = wait_group_after(c, n0)

        # A reboot (everything on the host killed -9): the node comes back,
        # in the role it recorded, from the host's own disk.
        for name in ("b1", "a2"):
            before = h[name].unit(node_unit(name))["pid"]
            with open(h[name].file(f"/var/lib/cgmirror/{name}/node.json")) as f:
                record = json.load(f)
            h[name].reboot()
            u = h[name].wait_unit(node_unit(name))
            assert u["pid"] != before and u["starts"] == 1
            with open(h[name].file(f"/var/lib/cgmirror/{name}/node.json")) as f:
                again = json.load(f)
            assert (again["role"], again["role_seq"], again["node_id"]) == \
                (record["role"], record["role_seq"], record["node_id"])
            n1 = wait_group_after(c, n1)

        # A cut between the sites: groups stop, the mirror says why, and
        # they form again once the link heals.
        h.cut("a", "b")

        def reported():
            doc = c.cgmirror_json("mirror", "status")
            return doc["drain_failures_in_a_row"] > 0 or bool(doc["failures"]["pairs"])
        wait_until(reported, 120, "the mirror to report the cut")
        n1 = hardened(c)
        h.heal("a", "b")
        n1 = wait_group_after(c, n1)

        # A host rebooted while its site is cut off from everything starts
        # its node from its own disk alone, in its recorded role.
        h.isolate("a")
        before = h["a1"].unit(node_unit("a1"))["pid"]
        h["a1"].reboot()
        u = h["a1"].wait_unit(node_unit("a1"), timeout=60)
        assert u["pid"] != before
        with open(h["a1"].file("/var/lib/cgmirror/a1/node.json")) as f:
            assert json.load(f)["role"] == "primary"
        n1 = hardened(c)
        h.rejoin("a")
        n1 = wait_group_after(c, n1)

        # A role change: the node records it and exits 75; the unit starts
        # it again at once (RestartForceExitStatus=), in the new role.
        c.disable("cgmirror-mirror@h.service")
        wait_until(lambda: c.unit("cgmirror-mirror@h.service") is None, 120,
                   "the mirror unit to stop")
        before = h["b2"].unit(node_unit("b2"))["pid"]
        code = ("import sys, json; from coordinator import session;"
                " from coordinator.control import ControlClient;"
                " cfg = session.load(sys.argv[1]).secondary('b2');"
                " c = ControlClient(cfg.control, 30, cfg.spec().client_context());"
                " print(json.dumps(c.call('role', to='primary')))")
        r = c.python("-c", code, hostmod.SESSION)
        assert r.returncode == 0 and json.loads(r.stdout)["restarting"] is True, r.stderr
        u = h["b2"].wait_unit(node_unit("b2"), not_pid=before)
        assert u["exits"] == [protocol.RESTART_STATUS] and u["starts"] == 2
        wait_until(lambda: status_pids(c)["b2"] == (u["pid"], "primary"), 60,
                   "b2 to serve as a primary")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_supervisor_runs_the_unit_exactly_as_written(tmp_path):
    """The node unit install-units wrote on a host passes systemd-analyze
    verify, and the host's supervisor runs its ExecStart (%i filled in) and
    its restart settings as written: RestartForceExitStatus= is
    protocol.RESTART_STATUS."""
    need("nbdkit", "unshare", "nsenter")
    if not IN_CI:
        need("systemd-analyze")
    need_netns()
    with Hosts(str(tmp_path)) as h:
        h.install(session_text(h))
        h.boot()
        h.enable_nodes()
        a1 = h["a1"]
        path = a1.file("/etc/systemd/system/cgmirror-node@.service")
        with open(path) as f:
            keys = hostmod.parse_unit(f.read())["Service"]
        u = a1.unit(node_unit("a1"))
        assert u["path"] == "/etc/systemd/system/cgmirror-node@.service"
        assert u["argv"] == shlex.split(keys["ExecStart"][0].replace("%i", "a1"))
        assert u["argv"][-3:] == ["node", "exec", "a1"]
        assert u["restart"] == keys["Restart"][0] == "on-failure"
        assert u["restart_sec"] == hostmod.seconds(keys["RestartSec"][0])
        assert u["force"] == keys["RestartForceExitStatus"] == [str(protocol.RESTART_STATUS)]
        assert u["type"] == "notify"
        inst = os.path.join(str(tmp_path), "cgmirror-node@a1.service")
        shutil.copy(path, inst)
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", inst],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# ------------------------------------------------------------------ the supervisor alone

def _supervisor(tmp_path, units: dict[str, str]):
    """A Supervisor over a unit directory of our own with ``units``
    ({template name: text}) all enabled as instance ``x``, on an abstract
    notify socket named for this test run."""
    ud = tmp_path / "system"
    (ud / "multi-user.target.wants").mkdir(parents=True)
    for name, text in units.items():
        (ud / name).write_text(text)
        (ud / "multi-user.target.wants" / name.replace("@.", "@x.")).symlink_to(ud / name)
    return hostmod.Supervisor(str(tmp_path), str(ud), f"@cgh-test-{os.getpid()}")


def _turn_until(sup, pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:"
                                 f" {[u.describe() for u in sup.units.values()]}")
        sup.step()


def test_supervisor_start_limit_and_readiness(tmp_path):
    """A unit that keeps failing is started StartLimitBurst times and then
    left failed (start-limit-hit); a Type=notify unit is active only once
    its main process says READY=1, and stopping it is not a failure."""
    py = shlex.quote(sys.executable)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sup = _supervisor(tmp_path, {
        "fail@.service": "[Unit]\nStartLimitBurst=3\n[Service]\nExecStart=/bin/sh -c"
                         " 'exit 1'\nRestart=on-failure\nRestartSec=10ms\n",
        "ready@.service": f"[Service]\nType=notify\nExecStart={py} -c \"import sys, time;"
                          f" sys.path.insert(0, '{root}'); from wire import sdnotify;"
                          f" time.sleep(0.2);"
                          f" sdnotify.notify(); time.sleep(600)\"\n",
    })
    try:
        sup.reconcile()
        fail, ready = sup.units["fail@x.service"], sup.units["ready@x.service"]
        assert ready.state == "activating"
        _turn_until(sup, lambda: fail.state == "failed", 60, "the start limit")
        assert (fail.started, fail.error, fail.exits) == (3, "start-limit-hit", [1, 1, 1])
        _turn_until(sup, lambda: ready.state in ("active", "failed"), 60, "READY=1")
        assert ready.state == "active", ready.describe()
        with open(tmp_path / "units.json") as f:
            assert json.load(f)["units"]["ready@x.service"]["state"] == "active"
    finally:
        sup.shutdown()
    assert ready.state == "inactive" and ready.exits == [-signal.SIGTERM]
