"""Operating cgmirror as admins run storage tools (issue 12): systemd units
run exactly as written with a real ``NOTIFY_SOCKET``, the Prometheus
endpoint scraped over HTTP, ``cgmirror events``, ``mirror status --watch``,
``check`` and ``--version``.  Real slaves, secondaries and mirrors (the rig
of tests/test_mirror.py)."""

from __future__ import annotations

import array
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from cgtest import closing_all, need, wait_until
from coordinator import cli, session as session_mod
from coordinator.mirror import events
from harness.mirrorrig import SIZE, session_text
from mirror2x2 import Rig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY_CLI = f"{shlex.quote(sys.executable)} -m coordinator.cli"


def write_session(run_dir, extra: str = "", **kw) -> str:
    """The mirror rig's session file with more ``[mirror]`` keys."""
    path = os.path.join(run_dir, "m.toml")
    with open(path, "w") as f:
        f.write(session_text(**kw).replace('control = "m.ctl"',
                                           f'control = "m.ctl"\n{extra}', 1))
    return path


class OpsRig(Rig):
    """The mirror rig with ``[mirror]`` keys of this file's tests."""

    extra = ""

    def write(self, **kw):
        self.path = write_session(self.run_dir, self.extra, **kw)
        self.session = session_mod.load(self.path)


@pytest.fixture
def ops_rig(slaves, run_dir):
    def build(extra="", **kw):
        OpsRig.extra = extra
        return OpsRig(slaves, run_dir, **kw)

    with closing_all(build) as make:
        yield make


class Lines:
    """A child's stdout read by a thread, so a test can wait with a bound."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.t.start()

    def _read(self, stream):
        with stream:                # closed at EOF: the child has exited
            for line in stream:
                self.q.put(line)
        self.q.put(None)

    def until(self, pred, timeout: float, what: str) -> list[str]:
        """Lines up to and including the first for which ``pred`` holds."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} in {timeout} s; got {seen}") from None
            if line is None:
                raise AssertionError(f"stream ended before {what}; got {seen}")
            seen.append(line)
            if pred(line):
                return seen


# ------------------------------------------------------------------ pure parts

def test_event_bus_keeps_order_and_says_what_a_slow_subscriber_lost():
    """Events arrive in order; a full queue drops the oldest and counts them."""
    bus = events.EventBus("m")
    q = bus.subscribe()
    for i in range(events.QUEUE_MAX + 3):
        bus.emit("group-formed", n=i)
    assert q.lost == 3
    assert q.get_nowait()["n"] == 3
    bus.unsubscribe(q)
    bus.emit("pause")
    assert q.qsize() == events.QUEUE_MAX - 1


@pytest.mark.parametrize("msg, words", [
    ({"op": "checksums", "volume": "a", "start": 0, "count": 0}, "count"),
    ({"op": "checksums", "volume": "a", "start": 0, "count": 1025}, "count"),
    ({"op": "checksums", "volume": "a", "start": -1, "count": 1}, "start"),
    ({"op": "checksums", "volume": "a", "start": 0, "count": 1, "block": 1}, "block"),
    ({"op": "rate", "rate": -1}, "rate"),
    ({"op": "rate"}, "rate"),
])
def test_checksums_and_rate_requests_are_checked(msg, words):
    """The new ops' bad requests are refused with one line naming the key."""
    from wire import protocol
    with pytest.raises(protocol.ProtocolError, match=words) as ei:
        protocol.decode(json.dumps(msg))
    assert "\n" not in str(ei.value)


def test_version_is_the_package_version(capsys):
    """--version prints the installed version and exits 0."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cgmirror {cli.version()}"


def test_metrics_and_rate_keys(tmp_path):
    """[mirror] metrics and rate load; bad values are one line naming the key."""
    path = write_session(str(tmp_path), 'metrics = "127.0.0.1:9942"\nrate = "50M"')
    m = session_mod.load(path).mirror
    assert m.metrics == ("127.0.0.1", 9942) and m.rate == 50 << 20
    assert session_mod.load(write_session(str(tmp_path))).mirror.metrics is None
    for extra, words in (('metrics = "9942"', "must be \"HOST:PORT\""),
                         ('rate = "1K"', "at least 4K"),
                         ('rate = "fast"', "rate")):
        with pytest.raises(session_mod.ConfigError, match=words) as ei:
            session_mod.load(write_session(str(tmp_path), extra))
        assert "\n" not in str(ei.value)


def test_check_says_what_it_checked_and_starts_nothing(tmp_path, capsys):
    """check on a good session: exit 0, one line per check; no process, no file."""
    path = write_session(str(tmp_path))
    assert cli.main(["-s", path, "check"]) == 0
    out = capsys.readouterr().out
    assert "checked: s1/a: image" in out and "will be created (16.0 MiB)" in out
    assert "nothing was started" in out
    assert sorted(os.listdir(tmp_path)) == ["m.toml"]


def test_check_refuses_an_image_it_cannot_create(tmp_path, capsys):
    """A missing image without a size: exit CONFIG, one line, JSON lists it."""
    path = write_session(str(tmp_path))
    with open(path) as f:
        text = f.read().replace(f'path = "r2-b.img"\nsize = {SIZE}\n', 'path = "r2-b.img"\n')
    with open(path, "w") as f:
        f.write(text)
    assert cli.main(["-s", path, "check", "--json"]) == 3
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["ok"] is False and doc["problems"] == [
        f"r2/b: image {tmp_path}/r2-b.img does not exist and has no size to create it with"]
    assert cap.err.count("\n") == 1, cap.err


# ------------------------------------------------------------------ systemd units

def exec_start(unit_path: str, instance: str) -> list[str]:
    """The unit's ExecStart, instance substituted, as systemd would split it."""
    with open(unit_path) as f:
        line = next(x for x in f if x.startswith("ExecStart="))
    return shlex.split(line[len("ExecStart="):].strip().replace("%i", instance))


class Notify:
    """A NOTIFY_SOCKET of our own: the datagrams and the sender's pid."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[str, int]:
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", raw[:12])[0]
        return data.decode(), pid

    def close(self):
        self.sock.close()


def test_units_verify_and_their_command_lines_serve_after_ready(run_dir):
    """install-units writes units systemd-analyze accepts; each ExecStart, run
    as written, says READY=1 (from its main pid) once it serves, and SIGTERM
    stops it cleanly; the mirror unit follows the nodes."""
    need("nbdkit", "systemd-analyze")
    path = write_session(run_dir)
    units = os.path.join(run_dir, "units")
    assert cli.main(["-s", path, "install-units", "--dir", units, "--exec", PY_CLI]) == 0
    s = session_mod.load(path)
    instances = [("node", c.name) for c in s.slaves] + \
                [("node", r.name) for r in s.secondaries] + [("mirror", "m")]
    for kind, name in instances[::2] + [instances[-1]]:     # one of each kind at least
        inst = os.path.join(units, f"cgmirror-{kind}@{name}.service")
        shutil.copy(os.path.join(units, f"cgmirror-{kind}@.service"), inst)
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", inst],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    with open(os.path.join(units, "cgmirror-mirror@.service")) as f:
        text = f.read()
    assert "After=cgmirror-node@s1.service cgmirror-node@s2.service" \
        " cgmirror-node@r1.service cgmirror-node@r2.service" in text
    assert "Type=notify" in text and "Restart=on-failure" in text

    notify = Notify(os.path.join(run_dir, "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    procs: list[subprocess.Popen] = []
    try:
        for kind, name in instances:
            cmd = exec_start(os.path.join(units, f"cgmirror-{kind}@.service"), name)
            with open(os.path.join(run_dir, f"{name}.log"), "w") as log:
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=log)
            procs.append(p)
            state, pid = notify.receive(60)
            assert state == "READY=1" and pid == p.pid, (state, pid, p.pid)
            # Serving at READY: the control channel answers at once.
            if kind == "mirror":
                doc = json.loads(subprocess.run(
                    [sys.executable, "-m", "coordinator.cli", "-s", path, "mirror",
                     "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                    timeout=60).stdout)
                assert doc["state"] in ("running", "starting") and doc["pid"] == p.pid
                wait_until(lambda: json.loads(subprocess.run(
                    [sys.executable, "-m", "coordinator.cli", "-s", path, "mirror",
                     "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                    timeout=60).stdout)["hardened"], 120, "a hardened group")
            else:
                cfg = next(c for c in list(s.slaves) + list(s.secondaries)
                           if c.name == name)
                from coordinator.link import SlaveLink
                with SlaveLink(name, cfg.control) as lk:
                    assert lk.status()["pid"] == p.pid
        for p in reversed(procs):           # the mirror first, as systemd would
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
        notify.close()


# ------------------------------------------------------------------ metrics, events

def scrape(port: int) -> dict:
    """{name: [(labels, value)]} from the endpoint, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_endpoint_scraped_and_parsed(ops_rig):
    """RPO, hardened group, groups, histograms, bytes, dirty bytes per volume,
    up gauges: scraped over HTTP on loopback and parsed by the client's parser."""
    r = ops_rig('metrics = "127.0.0.1:0"')
    m = r.start_mirror()
    wait_until(lambda: m.formed >= 2, 60, "two groups")
    wait_until(lambda: len(m.peers.replies) == 4, 30, "the peers polled")
    got = scrape(m.metrics.port)
    one = {k: v[0][1] for k, v in got.items() if len(v) == 1}
    assert got["cgmirror_rpo_seconds"][0][0] == {"session": "m"}
    assert 0 <= one["cgmirror_rpo_seconds"] < 60
    assert one["cgmirror_hardened_group"] >= 2
    assert one["cgmirror_groups_formed_total"] >= 2
    assert one["cgmirror_sent_bytes_total"] >= 4 * SIZE         # the first full copy
    assert one["cgmirror_hold_seconds_count"] >= 2
    assert one["cgmirror_drain_seconds_count"] >= 2
    assert {(lb["slave"], lb["volume"]) for lb, _ in got["cgmirror_dirty_bytes"]} == {
        ("s1", "a"), ("s1", "b"), ("s2", "a"), ("s2", "b")}
    assert sorted((lb["slave"], v) for lb, v in got["cgmirror_slave_up"]) == [
        ("s1", 1), ("s2", 1)]
    assert sorted((lb["slave"], v) for lb, v in got["cgmirror_secondary_up"]) == [
        ("r1", 1), ("r2", 1)]
    labels = {k for vals in got.values() for lb, _ in vals for k in lb}
    assert labels <= {"session", "slave", "volume", "le"}


def test_metrics_are_off_by_default(ops_rig):
    """No metrics key: no endpoint."""
    r = ops_rig()
    m = r.open_mirror()
    assert m.metrics is None


def test_events_stream_groups_pause_resume_and_a_secondary_going(ops_rig, capsys):
    """cgmirror events prints one JSON object a line: group-formed, pause,
    resume, slave-down and slave-up of a secondary that stops and returns
    (and the metrics say it was down)."""
    r = ops_rig('metrics = "127.0.0.1:0"')
    m = r.start_mirror()
    p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", r.path,
                          "events"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    r.children.append(p)
    out = Lines(p.stdout)

    def is_(kind, **kw):
        def pred(line):
            doc = json.loads(line)
            return doc["event"] == kind and all(doc.get(k) == v for k, v in kw.items())
        return pred
    seen = out.until(is_("group-formed"), 60, "group-formed")
    assert all(json.loads(x)["session"] == "m" for x in seen)
    assert cli.main(["-s", r.path, "mirror", "pause"]) == 0
    out.until(is_("pause"), 30, "pause")
    assert cli.main(["-s", r.path, "mirror", "resume"]) == 0
    out.until(is_("resume"), 30, "resume")
    spec = r.procs["r2"].spec
    r.procs["r2"].stop(timeout=30)
    down = json.loads(out.until(is_("slave-down", name="r2"), 30, "r2 down")[-1])
    assert down["role"] == "secondary" and down["error"]
    up = dict((lb["slave"], v) for lb, v in scrape(m.metrics.port)["cgmirror_secondary_up"])
    assert up == {"r1": 1, "r2": 0}
    failed = json.loads(out.until(is_("group-failed"), 60, "a group failing")[-1])
    assert failed["error"], failed
    r.procs["r2"] = r.slaves.restart(spec)
    out.until(is_("slave-up", name="r2"), 30, "r2 up")
    out.until(is_("group-formed"), 60, "a group after r2 returned")
    r.stop_mirror()
    assert p.wait(30) == 4          # the mirror went away: UNREACHABLE
    out.t.join(30)
    capsys.readouterr()


def test_status_watch_redraws_until_ctrl_c(ops_rig):
    """mirror status --watch redraws the table; Ctrl-C ends it with exit 0."""
    # rpo: a loaded machine can take longer than the rig's 30 s over the first
    # full copy, and the state would read "severe", not "running".
    r = ops_rig(rpo=3600)
    m = r.start_mirror()
    wait_until(lambda: m.formed >= 1, 120, "a group")
    p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", r.path, "mirror",
                          "status", "--watch"], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    r.children.append(p)
    out = Lines(p.stdout)
    out.until(lambda x: "\x1b[2J" in x, 60, "a first screen")
    screen = out.until(lambda x: "\x1b[2J" in x, 60, "a second screen")
    assert any("session m: running" in x for x in screen), screen
    assert any("SLAVE" in x and "ETA" in x for x in screen), screen
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 0
    out.t.join(30)


# ------------------------------------------------------------------ rate limit

def test_pacer_lets_through_no_more_than_the_rate():
    """The token bucket: after the burst, bytes go at most at the rate; rate 0
    lets everything through; a new rate applies to the next request."""
    from nbdplugin.copier import RATE_BURST_S, Pacer
    now = [0.0]
    p = Pacer(1000, clock=lambda: now[0])
    sent = 0
    while now[0] < 10.0:
        wait = p.delay(100)
        if wait == 0:
            sent += 100
        else:
            now[0] += wait
    assert sent <= 1000 * (10.0 + RATE_BURST_S) + 100
    assert sent >= 1000 * 10.0 - 100
    p.rate = 0
    assert p.delay(1 << 30) == 0
    p.rate, p.tokens, p.refilled = 1000, -500.0, now[0]
    assert p.delay(1) == pytest.approx(0.5)


def group_one(r) -> dict:
    """The history row of the first group (the full copy), once it is
    recorded (the mirror counts a group before its row is written)."""
    from coordinator.history import History

    def row():
        h = History(r.session.state_dir)
        try:
            return next(g for g in h.groups(limit=1000) if g["n"] == 1)
        finally:
            h.close()
    wait_until(lambda: row()["outcome"] != "running", 30, "group 1 recorded")
    return row()


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_rate_limited_drain_takes_at_least_what_the_limit_implies(ops_rig, monkeypatch,
                                                                    engine):
    """[mirror] rate = 4M: the first full copy (16 MiB a volume) drains in no
    less than (16 MiB - one burst) / 4 MiB/s, in either copy engine; the
    remote equals the primary."""
    monkeypatch.setenv("CGMIRROR_COPY_ENGINE", engine)     # the slaves inherit it
    r = ops_rig('rate = "4M"')
    m = r.start_mirror()
    wait_until(lambda: m.formed >= 1, 120, "the first group")
    floor_ms = (SIZE - 4 * 2 ** 20 * 0.1 - 2 ** 20) / (4 * 2 ** 20) * 1000
    g = group_one(r)
    assert g["outcome"] == "hardened" and g["drain_ms"] >= floor_ms, (g, floor_ms)
    r.stop_mirror()
    r.assert_equal()


def test_changing_the_rate_at_run_time_takes_effect(ops_rig, capsys):
    """At 256 KiB/s the full copy would take 64 s; `mirror rate 0` mid-drain
    lifts the limit and the group hardens long before that."""
    r = ops_rig('rate = "256K"')
    m = r.start_mirror()
    wait_until(lambda: m.phase == "drain", 60, "the first drain")
    wait_until(lambda: r.replication_bytes() > 0, 60, "bytes sent under the limit")
    assert cli.main(["-s", r.path, "mirror", "rate", "0"]) == 0
    assert "drain limit unlimited" in capsys.readouterr().out
    wait_until(lambda: m.formed >= 1, 120, "the first group")
    g = group_one(r)
    assert g["drain_ms"] < SIZE / (256 << 10) * 1000 * 0.9, g
    assert cli.main(["-s", r.path, "mirror", "rate", "1M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rate_bytes_s"] == 1 << 20
    assert cli.main(["-s", r.path, "mirror", "rate", "fast"]) == 2
    assert "rate 'fast'" in capsys.readouterr().err


# ------------------------------------------------------------------ online verify

class Writer:
    """Host writes to blocks [0, blocks) of one primary volume until stopped."""

    def __init__(self, uri: str, granularity: int, blocks: int):
        import nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.g, self.blocks = granularity, blocks
        self.stop = threading.Event()
        self.writes = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        i = 0
        while not self.stop.is_set():
            self.h.pwrite(os.urandom(4096), (i % self.blocks) * self.g)
            self.writes += 1
            i += 1
            self.stop.wait(0.002)

    def close(self):
        self.stop.set()
        self.t.join(30)
        self.h.shutdown()


def pause_after_a_hardened_group(r, m, capsys, tries: int = 5) -> None:
    """``mirror pause``, landing after a group that hardened (a verify while
    paused needs one); a pause after a failed group is resumed and tried
    again."""
    for _ in range(tries):
        assert cli.main(["-s", r.path, "mirror", "pause"]) == 0
        capsys.readouterr()
        wait_until(lambda: m.state == "paused", 120, "paused")
        if m.last is not None and m.last.outcome == "hardened":
            return
        formed = m.formed
        assert cli.main(["-s", r.path, "mirror", "resume"]) == 0
        capsys.readouterr()
        wait_until(lambda: m.formed > formed, 120, "a group after the resume")
    raise AssertionError(f"no pause after a hardened group in {tries} tries: {r.logs[-5:]}")


def test_online_verify_finds_the_one_corrupt_remote_block_and_repair_fixes_it(
        ops_rig, capsys):
    """A block changed at the remote behind cgmirror's back: verify (host
    writes going on) reports exactly it; --repair has the next group resend
    it, after which the remote equals the primary and verify finds nothing."""
    r = ops_rig()
    m = r.start_mirror()
    wait_until(lambda: m.formed >= 1, 120, "the first group")
    g = r.status("s1")["volumes"]["a"]["granularity"]
    bad = 37
    writer = Writer(r.procs["s1"].spec.uri("a"), g, 8)
    try:
        wait_until(lambda: writer.writes > 50, 30, "host writes")
        assert cli.main(["-s", r.path, "verify", "--json"]) == 0
        clean = json.loads(capsys.readouterr().out)
        assert clean["differing_blocks"] == 0 and clean["group"] >= 1
        # No group may start between the damage and its repair: its drain
        # would find the baseline gone (block 37 differs) and fail, so would
        # every later one, and a verify waits for a hardened group.
        pause_after_a_hardened_group(r, m, capsys)
        # Behind cgmirror's back: the secondary's image file itself.
        fd = os.open(os.path.join(r.run_dir, "r1-a.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5" * 512, bad * g + 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert cli.main(["-s", r.path, "verify", "--json"]) == 1
        doc = json.loads(capsys.readouterr().out)
        assert doc["differing_blocks"] == 1, doc
        assert doc["volumes"]["s1"]["a"]["differ"] == [[bad, 1]]
        assert doc["volumes"]["s1"]["a"]["compared"] + \
            doc["volumes"]["s1"]["a"]["skipped"] == SIZE // g
        assert cli.main(["-s", r.path, "verify"]) == 1
        text = capsys.readouterr().out
        assert "s1     a       r1/a" in text and "1 blocks differ" in text, text
        formed = m.formed
        assert cli.main(["-s", r.path, "verify", "--repair", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["volumes"]["s1"]["a"]["marked"] == 1
        assert cli.main(["-s", r.path, "mirror", "resume"]) == 0
        capsys.readouterr()
        wait_until(lambda: m.formed >= formed + 2, 120, "groups after the repair")
    finally:
        writer.close()
    wait_until(lambda: m.formed >= formed + 4, 120, "groups after the writes")
    assert cli.main(["-s", r.path, "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["differing_blocks"] == 0
    r.stop_mirror()
    r.assert_equal()


def test_progress_shows_eta_in_binary_units():
    """The copy progress bar: IEC sizes and speed, and the time left."""
    import io
    from coordinator import output

    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    bar = output.ProgressBar("copy", out)
    bar.t0 = time.monotonic() - 10          # 10 s in: 1 GiB of 4 GiB done
    bar({"done_bytes": 1 << 30, "total_bytes": 4 << 30})
    line = out.getvalue()
    assert "1.0 GiB / 4.0 GiB" in line and "MiB/s" in line and "ETA 30 s" in line, line
    assert " MB" not in line
    assert output.eta(0, 10, 1.0) == "-" and output.eta(10, 10, 1.0) == "0 s"
    assert output.eta(1, 3601, 1.0) == "1 h 00 min"
    assert output.rate(50 << 20) == "50.0 MiB/s" and output.rate(0) == "unlimited"


def test_verify_requests_wait_for_the_cycle_and_runs_are_merged():
    """A verify asked from a control thread runs when the cycle serves it and
    returns its report; refused ones raise; differing blocks become runs."""
    from coordinator.mirror import verify
    from coordinator.errors import LocalError
    woken = []
    reqs = verify.Requests(lambda: woken.append(1))
    got = []
    t = threading.Thread(target=lambda: got.append(reqs.ask(True, 30)))
    t.start()
    wait_until(reqs.pending, 10, "the request")
    reqs.serve(lambda repair: {"repair": repair})
    t.join(10)
    assert got == [{"repair": True}] and woken and not reqs.pending()
    errs = []

    def ask():
        try:
            reqs.ask(False, 30)
        except LocalError as exc:
            errs.append(str(exc))
    t = threading.Thread(target=ask)
    t.start()
    wait_until(reqs.pending, 10, "the request")
    reqs.refuse(LocalError("stopped"))
    t.join(10)
    assert errs == ["stopped"]
    assert verify.runs_of([1, 2, 3, 7, 9, 10]) == [[1, 3], [7, 1], [9, 2]]
