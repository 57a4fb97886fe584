"""Hosts: simulated machines, each with its own network, its own /etc,
/var/lib and /run, and a service manager that runs cgmirror's units.

    with Hosts(base) as h:
        h.install(session_text(h))          # /etc/cgmirror on every host
        h.enable_nodes()                    # install-units + enable --now, per host
        h["c"].cgmirror("status", "--json")
        h["a1"].kill_unit("cgmirror-node@a1.service")   # restarted by its supervisor
        h["b1"].reboot()
        h.isolate("a"); ...; h.rejoin("a")          # or h.cut("a", "b"), h.heal

A host (``Host``) is a network namespace of harness/sites.py (one address on
the rig's private bridge, cuts between sites there) plus a mount namespace
of its own, made at every boot (``unshare --mount --propagation private``),
in which three directories are the host's own:

``/etc``        an overlay: the machine's /etc below, the host's disk
                (``DIR/etc``) above -- so ``/etc/cgmirror`` (its copy of the
                session file, its ``pki/NAME``) and ``/etc/systemd/system``
                (the units install-units writes there) are the host's.
``/var/lib``    the same, over ``DIR/var-lib``: ``/var/lib/cgmirror`` holds
                the host's nodes' state and images, and survives a reboot.
``/run``        a fresh tmpfs at every boot, as on a real machine.

Nothing else is private (the project and its venv are "installed" on every
host by being visible), nothing is mounted in the machine's own namespace,
and the host directories live under the rig's base.  The upper layers are
plain directories: the rig writes into them what an administrator would
copy onto the host (``install``), and reads what a host wrote (``file``).

Every process of a host is started inside it: its supervisor by ``ip netns
exec`` + ``unshare``, everything else by ``nsenter`` into the supervisor's
namespaces (``Host.command``).

The supervisor (``main``, run as ``python -m harness.hosts init DIR``) is
the host's service manager, doing with the units what systemd does: at boot
it starts every unit enabled in ``/etc/systemd/system/*.wants`` (the links
``systemctl enable`` makes), each from its template as install-units wrote
it -- ``ExecStart=`` (specifiers %i %I %n %N %p %% substituted, split as
systemd splits it), ``Restart=``, ``RestartSec=``,
``RestartForceExitStatus=``, ``RestartPreventExitStatus=``,
``SuccessExitStatus=``, ``StartLimitBurst=``/``StartLimitIntervalSec=``,
``Type=notify`` with ``NOTIFY_SOCKET`` (``READY=1`` from the main pid makes
the unit active), ``TimeoutStopSec=``, ``Environment=`` (also from drop-ins
``UNIT.d/*.conf``, read when the unit is loaded, as systemd reads them at
daemon-reload: a test arms failpoints in a node this way) -- restarts a unit by systemd's table
(``should_restart``), and on SIGHUP reconciles with what is enabled now
(``systemctl daemon-reload`` + ``enable --now``/``disable --now``).  It
writes what it does to ``DIR/units.json`` (state, main pid, starts, exit
statuses) and each unit's output to ``DIR/journal/UNIT.log``.  SIGTERM is a
clean shutdown (every unit stopped with SIGTERM, SIGKILL after
TimeoutStopSec); ``Host.reboot`` is a crash: SIGKILL of every process of the
host, supervisor included, then a boot.

Links: ``cut(x, y)`` drops all IP between the hosts of sites x and y in the
hub (harness/sites.py: a WAN cut, TCP connections stay open and resume after
``heal``); ``isolate(site)`` cuts a site off from all others.

TCP with mutual TLS everywhere: ``Hosts`` makes the session's PKI (the CA
key stays in the rig's base, as on a coordinator's admin machine), issues
one certificate per host for its address, and ``session_text`` puts every
control channel and NBD export on ``tcp:`` addresses.  Ports are fixed
(control 7001, NBD 10809 on each host's own address): every host is a
private namespace where nothing else listens, and a real deployment uses
fixed ports too.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("a1", "a2", "b1", "b2", "c")
SITES = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c": "c"}
CONTROL_PORT = 7001
NBD_PORT = 10809
SESSION = "/etc/cgmirror/session.toml"
PKI = "/etc/cgmirror/pki"
STATE = "/var/lib/cgmirror"
UNIT_DIR = "/etc/systemd/system"
# The notify socket of every host's supervisor: abstract, so it is per
# network namespace (each host has its own) and names no path.
NOTIFY = "@cgmirror-host-notify"
# systemd's environment for services (no user's PATH, no PYTHON*).
UNIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the host's own layers sit in its directory, by mount point.
LAYERS = {"/etc": "etc", "/var/lib": "var-lib"}


class HostError(Exception):
    """The rig could not do what was asked; the message says why."""


# ------------------------------------------------------------- unit files

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (comments, blank
    lines and backslash continuations handled as systemd does)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        if section is None or "=" not in line:
            raise HostError(f"unit file line {raw!r}: not KEY=VALUE inside a [section]")
        k, v = line.split("=", 1)
        out[section].setdefault(k.strip(), []).append(v.strip())
    return out


def seconds(text: str) -> float:
    """A systemd time span ("1s", "500ms", "1min 30s", "2") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "": 1, "m": 60, "min": 60,
             "h": 3600, "hr": 3600}
    total, pos = 0.0, 0
    text = text.strip()
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        if m.start() != pos or m.group(2) not in units:
            raise HostError(f"time span {text!r}: not understood")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise HostError(f"time span {text!r}: not understood")
    return total


def statuses(values: list[str]) -> set:
    """RestartForceExitStatus= and kin: exit codes (int) and signals (Signals)."""
    out: set = set()
    for v in values:
        if not v:
            out.clear()             # an empty assignment resets the list
        for tok in v.split():
            if tok.isdigit():
                out.add(int(tok))
            else:
                name = tok if tok.startswith("SIG") else f"SIG{tok}"
                try:
                    out.add(signal.Signals[name])
                except KeyError:
                    raise HostError(f"exit status {tok!r}: neither a number nor a"
                                    f" signal name") from None
    return out


def specifiers(text: str, unit: str) -> str:
    """``text`` with systemd's specifiers of ``unit`` (NAME@INST.service)."""
    full = unit
    prefix, _, rest = unit.partition("@")
    inst = rest.rsplit(".", 1)[0] if rest else ""
    values = {"i": inst, "I": inst, "n": full, "N": full.rsplit(".", 1)[0], "p": prefix,
              "%": "%"}

    def sub(m):
        if m.group(1) not in values:
            raise HostError(f"{unit}: specifier %{m.group(1)} is not supported by the rig")
        return values[m.group(1)]
    return re.sub(r"%(.)", sub, text)


def dropins(path: str, unit: str) -> list[str]:
    """The drop-ins of instance ``unit`` of the unit file at ``path``, in
    systemd's order: ``*.conf`` of ``TEMPLATE.d/`` and ``INSTANCE.d/`` next
    to it, by file name, an instance's file hiding the template's of the
    same name (systemd.unit(5), "drop-in")."""
    base = os.path.dirname(path)
    template = re.sub(r"@[^.]*\.", "@.", unit)
    found: dict[str, str] = {}
    for d in dict.fromkeys((template, unit)):
        try:
            names = os.listdir(os.path.join(base, d + ".d"))
        except FileNotFoundError:
            continue
        found.update({n: os.path.join(base, d + ".d", n) for n in names if n.endswith(".conf")})
    return [found[n] for n in sorted(found)]


def environment(values: list[str]) -> dict[str, str]:
    """Environment= assignments (quoted as systemd quotes them; an empty
    one resets the list) as a dict."""
    out: dict[str, str] = {}
    for v in values:
        if not v:
            out.clear()
        for tok in shlex.split(v):
            key, eq, value = tok.partition("=")
            if not eq or not key:
                raise HostError(f"Environment={v}: {tok!r} is not KEY=VALUE")
            out[key] = value
    return out


# What systemd counts as a clean death by signal (systemd.service, Restart=).
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


class Unit:
    """One unit instance as the supervisor runs it."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        with open(path) as f:
            keys = parse_unit(f.read())
        for drop in dropins(path, name):
            with open(drop) as f:
                for section, values in parse_unit(f.read()).items():
                    for k, v in values.items():
                        keys.setdefault(section, {}).setdefault(k, []).extend(v)
        svc, unit = keys.get("Service", {}), keys.get("Unit", {})

        def last(section, key, default):
            values = [v for v in section.get(key, []) if v]
            return values[-1] if values else default
        exec_start = last(svc, "ExecStart", None)
        if exec_start is None:
            raise HostError(f"{path}: no ExecStart=")
        self.ignore_failure = False
        while exec_start[:1] in ("-", "@", ":", "+", "!"):
            self.ignore_failure |= exec_start[0] == "-"
            exec_start = exec_start[1:]
        self.argv = shlex.split(specifiers(exec_start, name))
        self.type = last(svc, "Type", "simple")
        self.notify_access = last(svc, "NotifyAccess", "main" if self.type == "notify"
                                  else "none")
        self.restart = last(svc, "Restart", "no")
        if self.restart not in RESTART_MODES:
            raise HostError(f"{path}: Restart={self.restart} is not one of"
                            f" {', '.join(RESTART_MODES)}")
        self.restart_sec = seconds(last(svc, "RestartSec", "100ms"))
        self.force = statuses(svc.get("RestartForceExitStatus", []))
        self.prevent = statuses(svc.get("RestartPreventExitStatus", []))
        self.success = statuses(svc.get("SuccessExitStatus", []))
        self.timeout_stop = seconds(last(svc, "TimeoutStopSec", "90s"))
        self.burst = int(last(unit, "StartLimitBurst", "5"))
        self.environment = environment(svc.get("Environment", []))
        self.interval = seconds(last(unit, "StartLimitIntervalSec", "10s"))
        # Run time.
        self.proc: subprocess.Popen | None = None
        self.state = "inactive"
        self.starts: list[float] = []       # start times within the start limit's interval
        self.started = 0                    # starts since boot
        self.exits: list[int] = []          # exit codes; -N for signal N
        self.restart_at: float | None = None
        self.stopping = False
        self.error: str | None = None

    def describe(self) -> dict:
        return {"state": self.state, "pid": self.proc.pid if self.proc else None,
                "starts": self.started, "exits": self.exits, "error": self.error,
                "path": self.path, "argv": self.argv, "type": self.type,
                "restart": self.restart, "restart_sec": self.restart_sec,
                "environment": self.environment,
                "force": sorted(_status_text(s) for s in self.force),
                "prevent": sorted(_status_text(s) for s in self.prevent)}


RESTART_MODES = ("no", "always", "on-success", "on-failure", "on-abnormal", "on-abort",
                 "on-watchdog")


def _status_text(s) -> str:
    return s.name if isinstance(s, signal.Signals) else str(s)


def should_restart(unit: Unit, returncode: int) -> bool:
    """systemd's rule (systemd.service(5), Restart= and the table there):
    Restart(Prevent|Force)ExitStatus= first, then the mode by how the main
    process ended (clean: exit 0 or SuccessExitStatus=, or SIGHUP, SIGINT,
    SIGTERM, SIGPIPE).  A stop that was asked never restarts."""
    if unit.stopping:
        return False
    status = returncode if returncode >= 0 else signal.Signals(-returncode)
    if status in unit.prevent:
        return False
    if status in unit.force:
        return True
    by_signal = returncode < 0
    clean = status in CLEAN_SIGNALS if by_signal else (status == 0 or status in unit.success)
    return {"no": False, "always": True, "on-success": clean, "on-failure": not clean,
            "on-abnormal": by_signal and not clean, "on-abort": by_signal and not clean,
            "on-watchdog": False}[unit.restart]


# ------------------------------------------------------------- the supervisor

class Supervisor:
    """The host's service manager (see the module doc)."""

    def __init__(self, hostdir: str, unit_dir: str = UNIT_DIR, notify: str = NOTIFY):
        self.dir, self.unit_dir, self.notify_name = hostdir, unit_dir, notify
        self.units: dict[str, Unit] = {}
        self.flags: set[str] = set()
        self.changed = True
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind("\0" + notify[1:])
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.makedirs(os.path.join(hostdir, "journal"), exist_ok=True)

    def enabled(self) -> dict[str, str]:
        """{instance name: its unit file} for every link in a ``*.wants``."""
        out = {}
        try:
            dirs = [d for d in os.listdir(self.unit_dir) if d.endswith(".wants")]
        except FileNotFoundError:
            return out
        for d in sorted(dirs):
            for name in sorted(os.listdir(os.path.join(self.unit_dir, d))):
                link = os.path.join(self.unit_dir, d, name)
                if name.endswith(".service"):
                    out[name] = os.path.realpath(link)
        return out

    def reconcile(self) -> None:
        want = self.enabled()
        for name, u in list(self.units.items()):
            if name not in want:
                self.stop(u)
                del self.units[name]
        for name, path in want.items():
            if name in self.units:
                continue
            try:
                u = Unit(name, path)
            except (OSError, HostError) as exc:
                u = _Failed(name, path, str(exc))
                self.units[name] = u
                continue
            self.units[name] = u
            self.start(u)
        self.changed = True

    def start(self, u: Unit) -> None:
        now = time.monotonic()
        u.starts = [t for t in u.starts if now - t < u.interval]
        u.restart_at = None
        if len(u.starts) >= u.burst:
            u.state, u.error = "failed", "start-limit-hit"
            self.changed = True
            return
        u.starts.append(now)
        u.started += 1
        env = {"PATH": UNIT_PATH, "LANG": "C.UTF-8", **u.environment}
        if u.type == "notify":
            env["NOTIFY_SOCKET"] = self.notify_name
        log = open(os.path.join(self.dir, "journal", f"{u.name}.log"), "ab")
        with log:
            try:
                u.proc = subprocess.Popen(u.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, env=env, cwd="/",
                                          start_new_session=True)
            except OSError as exc:
                u.proc, u.state, u.error = None, "failed", f"{u.argv[0]}: {exc}"
                self.changed = True
                return
        u.state = "activating" if u.type == "notify" else "active"
        u.stopping, u.error = False, None
        self.changed = True

    def stop(self, u: Unit) -> None:
        if u.proc is None or u.proc.poll() is not None:
            u.state = "inactive"
            return
        u.stopping = True
        u.state = "deactivating"
        u.proc.send_signal(signal.SIGTERM)
        try:
            u.proc.wait(u.timeout_stop)
        except subprocess.TimeoutExpired:
            u.proc.kill()
            u.proc.wait()
        u.exits.append(u.proc.returncode)
        u.proc, u.state = None, "inactive"
        self.changed = True

    def on_notify(self) -> None:
        data, anc, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(raw[:4], sys.byteorder)
        lines = data.decode(errors="replace").split("\n")
        for u in self.units.values():
            if u.proc is not None and u.notify_access != "none" and \
                    (u.notify_access == "all" or u.proc.pid == pid):
                if "READY=1" in lines and u.state == "activating":
                    u.state = "active"
                    self.changed = True

    def reap(self) -> None:
        now = time.monotonic()
        for u in self.units.values():
            if u.proc is not None and u.proc.poll() is not None:
                rc = u.proc.returncode
                u.exits.append(rc)
                u.proc = None
                if should_restart(u, rc):
                    u.state, u.restart_at = "auto-restart", now + u.restart_sec
                else:
                    clean = rc == 0 or rc in u.success or u.ignore_failure
                    u.state = "inactive" if clean else "failed"
                self.changed = True
            elif u.restart_at is not None and now >= u.restart_at:
                self.start(u)

    def write_status(self) -> None:
        doc = {"pid": os.getpid(), "up": True,
               "units": {n: u.describe() for n, u in self.units.items()}}
        tmp = os.path.join(self.dir, ".units.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "units.json"))
        self.changed = False

    def run(self) -> int:
        signal.signal(signal.SIGHUP, lambda *_: self.flags.add("reload"))
        signal.signal(signal.SIGTERM, lambda *_: self.flags.add("stop"))
        self.reconcile()
        while "stop" not in self.flags:
            if "reload" in self.flags:
                self.flags.discard("reload")
                self.reconcile()
            self.step()
        self.shutdown()
        return 0

    def step(self, timeout: float = 0.02) -> None:
        """One turn: take notifications, reap and restart, write the status."""
        ready, _, _ = select.select([self.notify], [], [], timeout)
        if ready:
            self.on_notify()
        self.reap()
        if self.changed:
            self.write_status()

    def shutdown(self) -> None:
        """Stop every unit, last started first; close the notify socket."""
        for u in reversed(list(self.units.values())):
            self.stop(u)
        self.write_status()
        self.notify.close()


class _Failed(Unit):
    """A unit whose file could not be used: shown as failed, never run."""

    def __init__(self, name: str, path: str, error: str):     # noqa: super not called
        self.name, self.path, self.error = name, path, error
        self.proc, self.state, self.starts, self.exits = None, "failed", [], []
        self.started = 0
        self.restart_at, self.stopping = None, False
        self.argv, self.type, self.restart, self.restart_sec = [], "", "", 0.0
        self.environment = {}
        self.force = self.prevent = self.success = set()
        self.notify_access = "none"


def boot(hostdir: str) -> int:
    """Inside the host's fresh mount namespace: mount its /etc, /var/lib
    (overlays over its directory) and /run (tmpfs), then supervise."""
    for mnt, layer in LAYERS.items():
        upper = os.path.join(hostdir, layer)
        work = os.path.join(hostdir, f".{layer}-work")
        os.makedirs(upper, mode=0o755, exist_ok=True)
        os.makedirs(work, mode=0o700, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mnt},upperdir={upper},workdir={work}", mnt],
                       check=True, capture_output=True, timeout=30)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", "/run"],
                   check=True, capture_output=True, timeout=30)
    os.makedirs("/run/cgmirror", mode=0o755, exist_ok=True)
    return Supervisor(hostdir).run()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "init":
        print("usage: python -m harness.hosts init HOSTDIR  (inside a host's namespaces)",
              file=sys.stderr)
        return 2
    return boot(argv[1])


# ------------------------------------------------------------- the rig side

class Host:
    """One simulated machine (see the module doc)."""

    def __init__(self, rig: "Hosts", site, hostdir: str):
        self.rig, self.site, self.dir = rig, site, hostdir
        self.name, self.addr = site.name, site.addr
        self.init: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr})"

    # -- processes inside the host --------------------------------------

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` wrapped so that it runs inside this host (booted)."""
        if self.init is None or self.init.poll() is not None:
            raise HostError(f"host {self.name} is not up")
        return ["nsenter", "-t", str(self.init.pid), "-m", "-n", "--", *cmd]

    def run(self, cmd: list[str], timeout: float = 120, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the host to completion (text output captured)."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("cwd", ROOT)
        return subprocess.run(self.command(cmd), timeout=timeout, check=check, **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside the host; stopped and reaped at teardown."""
        kw.setdefault("cwd", ROOT)
        p = subprocess.Popen(self.command(cmd), **kw)
        self.procs.append(p)
        return p

    def python(self, *args: str, timeout: float = 120, check: bool = False):
        """This installation's Python inside the host."""
        return self.run([sys.executable, *args], timeout=timeout, check=check)

    def cgmirror(self, *args: str, timeout: float = 240,
                 check: bool = False) -> subprocess.CompletedProcess:
        """``cgmirror -s /etc/cgmirror/session.toml ARGS`` inside the host;
        ``check``: raise HostError (with its stderr) unless it exits 0."""
        r = self.python("-m", "coordinator.cli", "-s", SESSION, *args, timeout=timeout)
        if check and r.returncode != 0:
            raise HostError(f"host {self.name}: cgmirror {' '.join(args)} exited"
                            f" {r.returncode}: {r.stderr.strip()}")
        return r

    def cgmirror_json(self, *args: str, timeout: float = 240) -> dict:
        r = self.cgmirror(*args, "--json", timeout=timeout)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise HostError(f"host {self.name}: cgmirror {' '.join(args)} exited"
                            f" {r.returncode}: {r.stderr.strip()}") from None

    # -- boot, crash, units ---------------------------------------------

    def boot(self, timeout: float = 60) -> None:
        """Start the host: a fresh mount namespace, its layers mounted, its
        supervisor starting the enabled units."""
        if self.init is not None and self.init.poll() is None:
            raise HostError(f"host {self.name} is already up")
        remove(os.path.join(self.dir, "units.json"))
        with open(os.path.join(self.dir, "console.log"), "ab") as log:
            self.init = subprocess.Popen(
                self.site.command(["unshare", "--mount", "--propagation", "private", "--",
                                   sys.executable, "-m", "harness.hosts", "init", self.dir]),
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while (self.units_doc() or {}).get("pid") != self.init.pid:
            if self.init.poll() is not None:
                raise HostError(f"host {self.name} did not boot (exit {self.init.returncode}):"
                                f" {tail(os.path.join(self.dir, 'console.log'))}")
            if time.monotonic() > deadline:
                raise HostError(f"host {self.name} not up after {timeout:.0f} s")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """Every process of this host (all live in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", self.site.netns], capture_output=True,
                             text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def crash(self, timeout: float = 30) -> None:
        """Power off hard: SIGKILL every process of the host, supervisor and
        nodes, and wait until they are gone."""
        for p in self.pids():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                raise HostError(f"host {self.name}: processes {self.pids()} survive SIGKILL")
            time.sleep(0.02)
        for p in [self.init, *self.procs]:
            if p is not None:
                p.wait(timeout)
        self.procs.clear()
        self.init = None

    def reboot(self, timeout: float = 60) -> None:
        """A crash (kill -9 of everything on the host), then a boot."""
        self.crash()
        self.boot(timeout)

    def shutdown(self, timeout: float = 120) -> None:
        """A clean power-off: the supervisor stops every unit (SIGTERM)."""
        if self.init is not None and self.init.poll() is None:
            self.init.send_signal(signal.SIGTERM)
            try:
                self.init.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.crash()

    def units_doc(self) -> dict | None:
        """What the supervisor last wrote (``units.json``), or None."""
        try:
            with open(os.path.join(self.dir, "units.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def unit(self, name: str) -> dict | None:
        return ((self.units_doc() or {}).get("units") or {}).get(name)

    def wait_unit(self, name: str, state: str = "active", timeout: float = 120,
                  not_pid: int | None = None) -> dict:
        """Wait until unit ``name`` is in ``state`` (and, if given, runs
        with a main pid other than ``not_pid``); return its entry."""
        deadline = time.monotonic() + timeout
        while True:
            u = self.unit(name)
            if u and u["state"] == state and (not_pid is None or u["pid"] != not_pid):
                return u
            if u and u["state"] == "failed" and state != "failed":
                raise HostError(f"host {self.name}: {name} failed ({u['error']}):"
                                f" {tail(self.journal(name))}")
            if time.monotonic() > deadline:
                raise HostError(f"host {self.name}: {name} not {state} after {timeout:.0f}"
                                f" s (now {u and u['state']}): {tail(self.journal(name))}")
            time.sleep(0.05)

    def journal(self, unit: str) -> str:
        return os.path.join(self.dir, "journal", f"{unit}.log")

    def enable(self, *units: str) -> None:
        """``systemctl enable --now UNIT...`` inside the host: the links
        ``enable`` makes (WantedBy=multi-user.target), then the supervisor
        is told to reload (SIGHUP), which starts them."""
        wants = f"{UNIT_DIR}/multi-user.target.wants"
        script = f"mkdir -p {wants}"
        for u in units:
            template = re.sub(r"@[^.]*\.", "@.", u)
            script += f" && ln -sfn ../{shlex.quote(template)} {wants}/{shlex.quote(u)}"
        self.run(["sh", "-c", script], timeout=30)
        os.kill(self.init.pid, signal.SIGHUP)

    def disable(self, *units: str) -> None:
        """``systemctl disable --now UNIT...``: the links go, the supervisor
        reloads and stops them (SIGTERM, as systemd's stop)."""
        wants = f"{UNIT_DIR}/multi-user.target.wants"
        self.run(["rm", "-f", *(f"{wants}/{u}" for u in units)], timeout=30)
        os.kill(self.init.pid, signal.SIGHUP)

    def kill_unit(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to a unit's main process; return its pid."""
        u = self.unit(name)
        if not u or not u["pid"]:
            raise HostError(f"host {self.name}: {name} has no main process")
        os.kill(u["pid"], sig)
        return u["pid"]

    def file(self, path: str) -> str:
        """Where a file the host wrote under /etc or /var/lib is on the rig's disk."""
        for mnt, layer in LAYERS.items():
            if path == mnt or path.startswith(mnt + "/"):
                return os.path.join(self.dir, layer, os.path.relpath(path, mnt))
        raise HostError(f"{path} is not on a disk of host {self.name} (only"
                        f" {', '.join(LAYERS)} are)")


class Hosts:
    """The rig: hosts ``names`` on one private bridge (harness/sites.py),
    each with its own disk under ``base`` (a context manager)."""

    def __init__(self, base: str, names=NAMES, subnet: str = "10.218.0.0/24",
                 session: str = "h"):
        self.base, self.names, self.subnet, self.session = base, list(names), subnet, session
        self.hosts: dict[str, Host] = {}
        self.net = None
        self.pki = os.path.join(base, "pki")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self):
        return iter(self.hosts.values())

    def __enter__(self) -> "Hosts":
        from coordinator import pki
        from harness.sites import Sites
        self.net = Sites(self.names, self.subnet).__enter__()
        try:
            pki.init(self.pki, self.session)
            for site in self.net:
                d = os.path.join(self.base, site.name)
                os.makedirs(d, exist_ok=True)
                self.hosts[site.name] = Host(self, site, d)
                cert = "coordinator" if SITES.get(site.name) == "c" else site.name
                pki.issue(self.pki, cert, ips=[site.addr])
        except BaseException:
            self.net.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Crash every host, then remove the namespaces."""
        errors = []
        for h in self.hosts.values():
            try:
                h.crash()
            except Exception as exc:        # go on: the namespaces must go anyway
                errors.append(str(exc))
        if self.net is not None:
            self.net.close()
            self.net = None
        if errors:
            raise HostError("teardown: " + "; ".join(errors))

    def nodes(self) -> list[Host]:
        return [h for h in self if SITES.get(h.name) in ("a", "b")]

    def install(self, text: str, coordinators=None) -> None:
        """What an administrator copies onto every host: the session file
        (``/etc/cgmirror/session.toml``), the host's own certificate
        directory (``/etc/cgmirror/pki/NAME``) and, on the hosts that run
        cgmirror commands (``coordinators``; default: every host, since a
        coordinator may run at either site), the coordinator's
        (``pki/coordinator``: the session file's ``cert``)."""
        coordinators = set(self.names if coordinators is None else coordinators)
        for h in self:
            etc = os.path.join(h.dir, LAYERS["/etc"], "cgmirror")
            os.makedirs(etc, mode=0o755, exist_ok=True)
            with open(os.path.join(etc, "session.toml"), "w") as f:
                f.write(text)
            pki_dir = os.path.join(etc, "pki")
            os.makedirs(pki_dir, mode=0o700, exist_ok=True)
            certs = {"coordinator" if SITES.get(h.name) == "c" else h.name}
            if h.name in coordinators:
                certs.add("coordinator")
            for cert in sorted(certs):
                dst = os.path.join(pki_dir, cert)
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(os.path.join(self.pki, cert), dst)
            # The volumes' directory, as an administrator makes it (or an LV).
            os.makedirs(os.path.join(h.dir, LAYERS["/var/lib"], "cgmirror", "images"),
                        mode=0o700, exist_ok=True)

    def boot(self) -> None:
        for h in self:
            h.boot()

    def enable_nodes(self, timeout: float = 180) -> None:
        """On every node host: ``cgmirror install-units`` (into its
        /etc/systemd/system) and ``systemctl enable --now
        cgmirror-node@NAME``; wait until every node is active (READY=1)."""
        for h in self.nodes():
            h.cgmirror("install-units", check=True)
            h.enable(f"cgmirror-node@{h.name}.service")
        for h in self.nodes():
            h.wait_unit(f"cgmirror-node@{h.name}.service", timeout=timeout)

    def cut(self, site_a: str = "a", site_b: str = "b") -> None:
        """Cut every link between the hosts of two sites ("a", "b", "c")."""
        for x, y in self._pairs(site_a, site_b):
            self.net.cut(x, y)

    def heal(self, site_a: str = "a", site_b: str = "b") -> None:
        for x, y in self._pairs(site_a, site_b):
            self.net.heal(x, y)

    def isolate(self, site: str) -> None:
        """Cut site ``site`` ("a", "b" or "c") off from every other site."""
        for other in sorted({SITES[h.name] for h in self} - {site}):
            self.cut(site, other)

    def rejoin(self, site: str) -> None:
        """Undo ``isolate(site)``."""
        for other in sorted({SITES[h.name] for h in self} - {site}):
            self.heal(site, other)

    def _pairs(self, site_a, site_b):
        xs = [h.name for h in self if SITES.get(h.name) == site_a]
        ys = [h.name for h in self if SITES.get(h.name) == site_b]
        if not xs or not ys:
            raise HostError(f"no hosts at site {site_a!r} or {site_b!r}")
        return [(x, y) for x in xs for y in ys]


def session_text(rig: Hosts, volumes=("v0", "v1"), size: int = 8 << 20,
                 pairs=(("a1", "b1"), ("a2", "b2")), mirror: dict | None = None,
                 **session_keys) -> str:
    """A session over the rig's hosts: primaries a1, a2 each mirroring
    ``volumes`` to b1, b2; every node on its host's address over TCP with
    mutual TLS; state and images under /var/lib/cgmirror, certificates in
    /etc/cgmirror/pki, the mirror (on c) with a unix control in /run."""
    def table(header, keys):
        return ["", header] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]

    def node(name):
        addr = rig[name].addr
        return {"name": name, "state_dir": f"{STATE}/{name}",
                "control": f"tcp:{addr}:{CONTROL_PORT}", "nbd": f"tcp:{addr}:{NBD_PORT}"}
    out = table("[session]", {"name": rig.session, "state_dir": f"{STATE}/coordinator",
                              "pki": PKI, "cert": "coordinator", "lease_ms": 10000,
                              "max_coordination_ms": 2000, "copy_timeout_ms": 20000,
                              **session_keys})
    out += table("[mirror]", {"interval_ms": 200, "max_drain_ms": 30000,
                              "rpo_threshold_s": 60, "control": "/run/cgmirror/mirror.ctl",
                              **(mirror or {})})
    for s, r in pairs:
        out += table("[[slave]]", {**node(s), "threads": 2})
        for v in volumes:
            out += table("[[slave.volume]]", {"name": v, "path": f"{STATE}/images/{s}-{v}.img",
                                              "size": size, "secondary": r})
    for _, r in pairs:
        out += table("[[secondary]]", node(r))
        for v in volumes:
            out += table("[[secondary.volume]]", {"name": v,
                                                  "path": f"{STATE}/images/{r}-{v}.img",
                                                  "size": size})
    return "\n".join(out) + "\n"


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
