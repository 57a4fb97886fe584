"""The node's unit and its foreground supervisor (issue 18): one template
``cgmirror-node@`` that systemd accepts and that restarts a node on
``protocol.RESTART_STATUS``; ``launch.supervise`` (``cgmirror node run``, and
every detached start) starting a node again in its recorded role after a
role change, passing other exits up, and stopping cleanly on SIGTERM.

The supervisor's loop is driven with a stand-in node (a small script that
exits as told): the loop is plain process management, not the data path.
Real nbdkit nodes under it are in the tests below them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading

import pytest

from cgtest import IN_CI, need, wait_until
from coordinator import cli, launch, session as session_mod
from coordinator import errors as cli_errors
from coordinator.cli import units_cmds
from harness.mirrorrig import mirror_session
from wire import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY_CLI = f"{shlex.quote(sys.executable)} -m coordinator.cli"

# The stand-in node: appends its role to STATEDIR/runs, then does what the
# next line of STATEDIR/plan says: "exit N", "role R" (record role R in
# node.json, as the node does, and exit RESTART_STATUS), or "wait" (until
# SIGTERM, then write "term" and exit 0).
NODE = r"""
import json, os, signal, sys, time
statedir, role = sys.argv[1], sys.argv[2]
with open(os.path.join(statedir, "runs"), "a") as f:
    f.write(role + "\n")
n = sum(1 for _ in open(os.path.join(statedir, "runs")))
plan = open(os.path.join(statedir, "plan")).read().split("\n")
what, _, arg = plan[min(n, len(plan)) - 1].partition(" ")
if what == "exit":
    sys.exit(int(arg))
if what == "role":
    with open(os.path.join(statedir, "node.json"), "w") as f:
        json.dump({"role": arg}, f)
    sys.exit(75)
def term(*_):
    open(os.path.join(statedir, "term"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(os.path.join(statedir, "waiting"), "w").close()
while True:
    time.sleep(1)
"""


@dataclasses.dataclass
class StandIn(launch.SlaveSpec):
    """A spec whose process is the stand-in node above."""

    script: str = ""

    def command(self) -> list[str]:
        return [sys.executable, self.script, self.statedir, self.role]


def stand_in(tmp_path, plan: list[str]) -> StandIn:
    st = tmp_path / "st"
    st.mkdir()
    (st / "plan").write_text("\n".join(plan))
    script = tmp_path / "node.py"
    script.write_text(NODE)
    return StandIn(name="n1", statedir=str(st), nbd_socket=str(tmp_path / "n1.sock"),
                   control=str(tmp_path / "n1.ctl"), volumes=[], script=str(script))


def runs(spec) -> list[str]:
    with open(os.path.join(spec.statedir, "runs")) as f:
        return f.read().split()


def test_restart_status_is_ex_tempfail():
    """The role-change status is 75 (EX_TEMPFAIL), distinct from every
    status nbdkit exits with by itself (0, 1) and from signals (128+N)."""
    assert protocol.RESTART_STATUS == 75 == launch.RESTART_STATUS


def test_supervisor_starts_node_again_in_recorded_role(tmp_path):
    """A node that records a new role and exits 75 is started again at
    once, in that role; its next other exit status is passed up."""
    spec = stand_in(tmp_path, ["role secondary", "role primary", "exit 3"])
    said = []
    assert launch.supervise(spec, said.append) == 3
    assert runs(spec) == ["primary", "secondary", "primary"]
    assert said == ["slave n1 exited 75 (role change): starting it again as secondary",
                    "slave n1 exited 75 (role change): starting it again as primary"]
    assert launch.supervisor_pid(spec) is None          # its pidfile went with it


def test_supervisor_passes_any_other_exit_up(tmp_path):
    """Exit 0 or 1 ends the supervisor with the same status: only 75 restarts."""
    for status in (0, 1):
        d = tmp_path / str(status)
        d.mkdir()
        spec = stand_in(d, [f"exit {status}", "exit 9"])
        assert launch.supervise(spec, pytest.fail) == status
        assert runs(spec) == ["primary"]


def test_supervisor_gives_up_on_a_loop_of_restarts(tmp_path):
    """A node that asks for a restart more than RESTART_BURST times in the
    window is not started forever: one line, and it stops."""
    spec = stand_in(tmp_path, ["role secondary"])
    with pytest.raises(launch.LaunchError, match=r"^slave n1 asked to be started again 6"
                                                 r" times in 10 s; giving up: see its log$"):
        launch.supervise(spec, lambda line: None)
    assert len(runs(spec)) == launch.RESTART_BURST + 1


def test_supervisor_sigterm_stops_node_and_exits_0(tmp_path):
    """SIGTERM to the supervisor reaches the node (its clean stop) and the
    supervisor returns 0 without starting it again."""
    spec = stand_in(tmp_path, ["wait"])
    waiting = os.path.join(spec.statedir, "waiting")

    def terminate():
        wait_until(lambda: os.path.exists(waiting), 30, "the node to run")
        assert launch.supervisor_pid(spec) == os.getpid()
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=terminate)
    t.start()
    try:
        assert launch.supervise(spec, pytest.fail) == 0
    finally:
        t.join(60)
    assert os.path.exists(os.path.join(spec.statedir, "term"))
    assert runs(spec) == ["primary"]


def test_recorded_role_wins_and_a_damaged_record_is_one_line(tmp_path):
    """No node.json: the spec's (first) role; a record: its role; a damaged
    record: refused in one line naming the file."""
    spec = stand_in(tmp_path, ["exit 0"])
    assert launch.in_recorded_role(spec).role == "primary"
    path = os.path.join(spec.statedir, "node.json")
    with open(path, "w") as f:
        json.dump({"role": "secondary", "session": "x"}, f)
    assert launch.in_recorded_role(spec).role == "secondary"
    with open(path, "w") as f:
        f.write('{"role": "secon')
    with pytest.raises(launch.LaunchError) as ei:
        launch.in_recorded_role(spec)
    assert str(ei.value).startswith(f"{path} cannot be read (")
    assert "\n" not in str(ei.value)
    with open(path, "w") as f:
        json.dump({"role": "master"}, f)
    with pytest.raises(launch.LaunchError, match="records no role .'master'"):
        launch.in_recorded_role(spec)


# ------------------------------------------------------------------ the unit

def _session(run_dir) -> str:
    path = os.path.join(run_dir, "s.toml")
    with open(path, "w") as f:
        f.write(mirror_session("u", {"s1": "r1"}, ("a",), size=1 << 20))
    return path


def unit_keys(path: str) -> dict[str, list[str]]:
    """Every key of a unit file and its values, in order."""
    keys: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            if "=" in line and not line.startswith(("#", ";", "[")):
                k, v = line.rstrip("\n").split("=", 1)
                keys.setdefault(k, []).append(v)
    return keys


def test_install_units_writes_the_node_template(run_dir, capsys):
    """install-units writes cgmirror-node@ with ExecStart `node exec %i`,
    Restart=on-failure and RestartForceExitStatus=RESTART_STATUS, and the
    mirror unit ordered after every node; old templates in the directory are
    removed, and it says how to move their instances."""
    path = _session(run_dir)
    units = os.path.join(run_dir, "units")
    os.makedirs(units)
    for old in units_cmds.OLD_UNITS:
        open(os.path.join(units, old), "w").close()
    assert cli.main(["-s", path, "install-units", "--dir", units, "--exec", PY_CLI]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(units)) == ["cgmirror-mirror@.service", "cgmirror-node@.service"]
    assert ("removed the old cgmirror-slave@.service, cgmirror-secondary@.service: nodes run"
            " as cgmirror-node@NAME now; where one ran: systemctl disable --now"
            " cgmirror-slave@s1 cgmirror-secondary@r1") in out
    assert "systemctl enable --now cgmirror-node@s1 cgmirror-node@r1" in out
    keys = unit_keys(os.path.join(units, "cgmirror-node@.service"))
    assert keys["ExecStart"] == [f"{PY_CLI} -s {path} node exec %i"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["RestartForceExitStatus"] == [str(protocol.RESTART_STATUS)]
    assert keys["Type"] == ["notify"]
    mirror = unit_keys(os.path.join(units, "cgmirror-mirror@.service"))
    assert "After=cgmirror-node@s1.service cgmirror-node@r1.service" in \
        [f"After={v}" for v in mirror["After"]]
    assert "Wants" not in mirror or all("cgmirror-node" not in v for v in mirror["Wants"])


def test_node_unit_passes_systemd_analyze_verify(run_dir):
    """systemd-analyze verify accepts an instance of the installed node
    unit with nothing on stderr (skipped only outside CI without systemd)."""
    if not IN_CI:
        need("systemd-analyze")
    path = _session(run_dir)
    units = os.path.join(run_dir, "units")
    assert cli.main(["-s", path, "install-units", "--dir", units, "--exec", PY_CLI]) == 0
    inst = os.path.join(units, "cgmirror-node@s1.service")
    with open(os.path.join(units, "cgmirror-node@.service")) as src, open(inst, "w") as dst:
        dst.write(src.read())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", inst],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# ------------------------------------------------------------------ real nodes

def _status(control: str) -> dict | None:
    """The node's status, or None while it does not answer."""
    try:
        with launch.ControlClient(control, 5) as c:
            return c.call("status")
    except launch.ControlError:
        return None


def _wait_serving(control: str, other_than: int | None = None, timeout: float = 60) -> dict:
    doc = {}

    def up():
        nonlocal doc
        doc = _status(control) or {}
        return doc.get("pid") not in (None, other_than)
    wait_until(up, timeout, f"a node serving {control}")
    return doc


def test_node_run_starts_a_real_node_again_in_its_new_role(run_dir):
    """`cgmirror node run s1`: the role op on the node records `secondary`,
    nbdkit exits 75 and the supervisor starts it again, now a secondary of
    the same session; SIGTERM then stops it and the supervisor exits 0."""
    need("nbdkit")
    path = _session(run_dir)
    cfg = session_mod.load(path).slave("s1")
    log = open(os.path.join(run_dir, "run.log"), "wb")
    p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", path, "node", "run",
                          "s1"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        first = _wait_serving(cfg.control)
        assert first["role"] == "primary" and first["session"] == "u" \
            and first["node"] == "s1"
        assert launch.supervisor_pid(cfg.spec()) == p.pid
        with launch.ControlClient(cfg.control, 30) as c:
            reply = c.call("role", to="secondary")
        assert reply["restarting"] is True and reply["role"] == "secondary"
        again = _wait_serving(cfg.control, other_than=first["pid"])
        assert again["role"] == "secondary" and again["role_seq"] == first["role_seq"] + 1
        assert p.poll() is None             # the same supervisor, still running
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert launch.running_pid(cfg.spec()) is None
        with open(os.path.join(run_dir, "run.log")) as f:
            assert "cgmirror: slave s1 exited 75 (role change): starting it again as" \
                   " secondary\n" in f.read()
    finally:
        if p.poll() is None:
            p.kill()        # nbdkit -f dies with it (PR_SET_PDEATHSIG)
        p.wait(30)
        log.close()


def test_detached_start_survives_a_role_change_and_stops_whole(run_dir):
    """`cgmirror slave start` (launch.start detached) runs the node under
    its supervisor: after a role change the node serves again in its new
    role, with no command run on its host; `slave stop` stops node and
    supervisor, and nothing starts it again."""
    need("nbdkit")
    path = _session(run_dir)
    assert cli.main(["-s", path, "slave", "start", "s1"]) == 0
    spec = session_mod.load(path).slave("s1").spec()
    try:
        sup = launch.supervisor_pid(spec)
        first = _wait_serving(spec.control)
        assert sup and first["pid"] == launch.running_pid(spec)
        with launch.ControlClient(spec.control, 30) as c:
            assert c.call("role", to="secondary")["restarting"] is True
        again = _wait_serving(spec.control, other_than=first["pid"])
        assert again["role"] == "secondary" and launch.supervisor_pid(spec) == sup
        # `slave start` again: it runs, in the role it recorded.
        assert cli.main(["-s", path, "slave", "start", "s1"]) == 0
        assert _status(spec.control)["pid"] == again["pid"]
        assert cli.main(["-s", path, "slave", "stop", "s1"]) == 0
        assert launch.supervisor_pid(spec) is None and launch.running_pid(spec) is None
        assert launch.wait_gone(sup, 30) and launch.wait_gone(again["pid"], 30)
    finally:
        launch.stop(spec, timeout=10)


def test_node_spec_takes_the_record_then_the_legacy_direction_then_the_file(run_dir):
    """Which role a node starts in comes from its host alone: its record;
    before its first start, a pre-issue-18 direction.json on this host; else
    the session file.  The plugin is told the session and the node."""
    from coordinator.cli.node_cmds import node_config, node_spec
    s = session_mod.load(_session(run_dir))
    r1 = node_config(s, "r1")
    spec = node_spec(s, r1)
    assert spec.role == "secondary" and spec.session == "u"
    assert {"session=u", "node=r1", "role=secondary"} <= set(spec.command())
    os.makedirs(s.state_dir, exist_ok=True)
    with open(os.path.join(s.state_dir, "direction.json"), "w") as f:
        json.dump({"source": "b", "state": "failed-over"}, f)
    assert node_spec(s, r1).role == "primary"
    assert node_spec(s, node_config(s, "s1")).role == "secondary"
    os.makedirs(r1.state_dir, exist_ok=True)
    with open(os.path.join(r1.state_dir, "node.json"), "w") as f:
        json.dump({"role": "secondary"}, f)
    assert node_spec(s, r1).role == "secondary"
    with pytest.raises(cli_errors.UsageError, match=r"^session u has no node 'x' \(its"
                                                    r" slaves and secondaries: s1, r1\)$"):
        node_config(s, "x")
