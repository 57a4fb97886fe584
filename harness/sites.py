"""Simulated sites: one network namespace per host, joined by a private bridge.

    with Sites(("a", "b", "c", "r")) as net:
        srv = net["r"].popen(["nbdkit", "-f", "-p", "0", "-i", net["r"].addr, ...])
        port = net["r"].wait_port(srv)
        net["a"].run([sys.executable, "client.py", f"nbd://{net['r'].addr}:{port}"])
        net.cut("a", "r"); ...; net.heal("a", "r")

Layout.  Every host namespace has ``lo`` up and one interface ``eth0`` with
an address from the test's private subnet (host i gets .i+1); the other end
of each ``eth0`` veth sits in a hub namespace on a bridge.  A bridge gives
every host one address that every other host reaches, and one place for
faults.  Rejected: a veth per pair of hosts (n*(n-1)/2 links, one address per
pair, so "the address of r" would depend on who asks) and a bridge in the root
namespace (visible to, and reachable from, the machine itself).

Isolation.  Nothing is added to the root namespace: no link, no address, no
route.  The host namespaces have no default route, so nothing they send can
leave the machine.  The converse is NOT true: the root namespace routes a
site address out through its default route, so a client must never run in
the root namespace -- start it with ``site.popen``/``site.run``.

Faults live in the hub, like a WAN fault: the hosts see nothing of them.
``cut(a, b)`` drops all IP between two hosts (a bridge-family nftables rule;
TCP connections stay open and resume after ``heal``, after TCP's backoff);
``rate(site, mbit)`` puts a ``tbf`` qdisc on both directions of a host's link.
This kernel has no ``netem``; latency belongs to nbdkit's ``delay`` filter.

Processes are started with ``ip netns exec``, which enters the namespace and
execs the command: the PID we hold is the process itself, stdin/stdout/stderr
are whatever the caller passes to ``subprocess.Popen``.  Teardown stops every
tracked process (SIGTERM, then SIGKILL, by PID) and reaps it, kills by PID
any process still inside one of our namespaces (a daemon a tracked process
left behind), waits for those to be gone, and only then deletes the
namespaces (which deletes their veths and the bridge).  It runs even when the
test failed.  Names are ``cgmns-<pid>-<n>-<host>`` so concurrent test runs do
not collide; namespaces of a test run whose process is dead are removed the
next time a ``Sites`` is made.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from pyroute2 import IPRoute, netns

PREFIX = "cgmns-"
HUB = "hub"
_counter = itertools.count()
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_STALE_RE = re.compile(re.escape(PREFIX) + r"(\d+)-\d+-[a-z0-9]+\Z")


class SitesError(Exception):
    """The namespaces could not be made or used; the message says why."""


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a sentence), or None if they can."""
    missing = [b for b in ("ip", "nft", "tc") if shutil.which(b) is None]
    if missing:
        return f"needs {', '.join(missing)} (iproute2, nftables: run `make setup`)"
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        netns.create(name)
    except OSError as exc:
        return f"cannot create a network namespace ({exc}); needs root and iproute2"
    try:
        netns.remove(name)
    except OSError as exc:
        return f"cannot remove network namespace {name} ({exc})"
    return None


def list_ours() -> list[str]:
    """Names of all namespaces made by this module (any test run)."""
    return sorted(n for n in netns.listnetns() if n.startswith(PREFIX))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)   # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return False
    return True


def _pids_in(name: str) -> list[int]:
    """PIDs of processes inside namespace ``name`` (zombies hold none)."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                         text=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def _wait_for(pred, timeout: float, what: str) -> None:
    """tests/cgtest.py's wait_until, raising SitesError: this module does not
    import pytest, so that the demo and the benches can use it."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SitesError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def sweep_stale() -> list[str]:
    """Remove namespaces left by test runs whose process is gone (one that was
    SIGKILLed never ran its teardown).  Returns the names removed."""
    removed = []
    for name in list_ours():
        m = _STALE_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            netns.remove(name)
            removed.append(name)
    return removed


class Site:
    """One simulated host: a namespace with ``lo`` and ``eth0`` at ``addr``."""

    def __init__(self, net: "Sites", name: str, netns_name: str, addr: str):
        self.net = net
        self.name = name
        self.netns = netns_name
        self.addr = addr

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {self.addr}, netns={self.netns})"

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` wrapped so that it runs inside this site."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside this site; stopped and reaped at teardown."""
        proc = subprocess.Popen(self.command(cmd), **kw)
        self.net.processes.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 60, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside this site to completion (text output captured
        unless the caller redirects it); raises on a non-zero exit if ``check``."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        # subprocess.run kills and reaps the child itself when the timeout hits.
        return subprocess.run(self.command(cmd), timeout=timeout, check=check, **kw)

    def wait_port(self, proc: subprocess.Popen, timeout: float = 10) -> int:
        """A TCP port ``proc`` listens on, once it listens (servers started
        with port 0 pick a free one, so tests name no fixed port).

        Read from /proc: ``/proc/PID/net/tcp*`` shows the sockets of PID's own
        namespace, and the listening inode must be one of PID's descriptors."""
        port = None

        def listening() -> bool:
            nonlocal port
            if proc.poll() is not None:
                raise SitesError(f"{proc.args[4:]!r} in site {self.name} exited "
                                 f"with {proc.returncode} before it listened")
            ports = listen_ports(proc.pid)
            port = min(ports, default=None)
            return port is not None

        _wait_for(listening, timeout, f"pid {proc.pid} to listen in site {self.name}")
        return port


def stop(proc: subprocess.Popen, timeout: float = 5) -> int:
    """SIGTERM ``proc``, SIGKILL it if it has not exited in ``timeout`` s,
    reap it and close its pipes.  Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return proc.returncode


def pause(pid: int, timeout: float = 10) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped.
    kill() returns before a thread running on the other core stops: such a
    thread answered a FREEZE sent right after (tests/twosites.py, 2 in 24
    runs), where the test needs a slave that takes it and never answers."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    task = f"/proc/{pid}/task"
    while not all(_state(os.path.join(task, t)) == "T" for t in os.listdir(task)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} did not stop within {timeout:g} s")
        time.sleep(0.001)


def _state(proc: str) -> str:
    """The state letter of /proc/PID or /proc/PID/task/TID ("T": stopped)."""
    try:
        with open(os.path.join(proc, "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:       # a thread that exited meanwhile
        return "T"


def listen_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (none if it is gone)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:   # closed while we looked
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            return set()
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class Sites:
    """Hosts in network namespaces on one private bridge (a context manager).

    ``names``: host names (lower-case letters and digits, at most 8);
    ``subnet``: an IPv4 network for their addresses, chosen by the test.
    """

    def __init__(self, names=("a", "b", "c", "r"), subnet: str = "10.213.0.0/24"):
        net = ipaddress.IPv4Network(subnet)
        names = list(names)
        for n in names:
            if not _NAME_RE.match(n) or n == HUB:
                raise SitesError(f"bad site name {n!r}: use 1-8 lower-case letters "
                                 f"or digits, starting with a letter, not {HUB!r}")
        if len(set(names)) != len(names):
            raise SitesError(f"site names repeat: {names}")
        if net.num_addresses - 2 < len(names):
            raise SitesError(f"subnet {subnet} has no room for {len(names)} hosts")
        self.subnet = net
        self.names = names
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.hub = f"{self.tag}-{HUB}"
        self.sites: dict[str, Site] = {}
        self.processes: list[subprocess.Popen] = []
        self._cuts: set[frozenset[str]] = set()

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def __iter__(self):
        return iter(self.sites.values())

    # -- setup and teardown -------------------------------------------------

    def __enter__(self) -> "Sites":
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        netns.create(self.hub)
        with IPRoute(netns=self.hub) as hub:
            hub.link("add", ifname="br0", kind="bridge")
            br = hub.link_lookup(ifname="br0")[0]
            hub.link("set", index=br, state="up")
            for i, name in enumerate(self.names):
                site = Site(self, name, f"{self.tag}-{name}",
                            str(self.subnet.network_address + i + 1))
                netns.create(site.netns)
                self.sites[name] = site
                # The veth is made in the hub with its peer born inside the
                # host's namespace: it never exists in the root namespace.
                hub.link("add", ifname=f"to-{name}", kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": site.netns})
                port = hub.link_lookup(ifname=f"to-{name}")[0]
                hub.link("set", index=port, master=br, state="up")
                with IPRoute(netns=site.netns) as h:
                    h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
                    eth = h.link_lookup(ifname="eth0")[0]
                    h.addr("add", index=eth, address=site.addr,
                           prefixlen=self.subnet.prefixlen)
                    h.link("set", index=eth, state="up")

    def close(self) -> None:
        """Stop every process, then delete every namespace (idempotent)."""
        errors = []
        # Last started, first stopped: a client goes before the server it
        # uses (nbdkit 1.32 ignores SIGTERM while a client stays connected:
        # server first would cost the 5 s SIGKILL fallback).
        for proc in reversed(self.processes):
            try:
                stop(proc)
            except Exception as exc:   # go on: the namespaces must go anyway
                errors.append(f"pid {proc.pid}: {exc}")
        self.processes.clear()
        ours = [n for n in netns.listnetns() if n.startswith(self.tag + "-")]
        strays = [pid for n in ours for pid in _pids_in(n)]
        for pid in strays:
            # Started (indirectly) by this test, inside a namespace it made.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            _wait_for(lambda: not any(_pids_in(n) for n in ours), 10,
                      f"processes {strays} to leave the namespaces")
        except SitesError as exc:
            errors.append(str(exc))
        for n in ours:
            try:
                netns.remove(n)
            except OSError as exc:
                errors.append(f"{n}: {exc}")
        self.sites.clear()
        if errors:
            raise SitesError("teardown: " + "; ".join(errors))

    def stop(self, proc: subprocess.Popen, timeout: float = 5) -> int:
        """Stop and reap a process started by ``site.popen`` before teardown."""
        rc = stop(proc, timeout)
        self.processes.remove(proc)
        return rc

    # -- faults -------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Drop all IP between hosts ``a`` and ``b``, both directions (not ARP)."""
        self._pair(a, b)
        self._cuts.add(frozenset((a, b)))
        self._apply_cuts()

    def heal(self, a: str, b: str) -> None:
        """Undo ``cut(a, b)``."""
        self._pair(a, b)
        self._cuts.discard(frozenset((a, b)))
        self._apply_cuts()

    def _pair(self, a: str, b: str) -> None:
        for n in (a, b):
            if n not in self.sites:
                raise SitesError(f"no site {n!r}; sites are {self.names}")
        if a == b:
            raise SitesError(f"cannot cut site {a!r} from itself")

    def _apply_cuts(self) -> None:
        # The whole table is replaced in one nft transaction, so a heal of one
        # pair never opens another for an instant.
        # Rules match bridge ports, not addresses, so IPv6 link-local traffic
        # is cut too.  ARP passes: a cut then looks like a WAN cut (silent
        # loss, TCP times out) rather than a dead LAN neighbour (EHOSTUNREACH
        # once ARP gives up), whichever host spoke first.
        rules = []
        for x, y in sorted(sorted(p) for p in self._cuts):
            rules += [f'iifname "to-{x}" oifname "to-{y}" meta protocol {{ ip, ip6 }} drop',
                      f'iifname "to-{y}" oifname "to-{x}" meta protocol {{ ip, ip6 }} drop']
        script = "table bridge cgm_cut\ndelete table bridge cgm_cut\n"
        if rules:
            script += ("table bridge cgm_cut {\n chain forward {\n"
                       "  type filter hook forward priority 0; policy accept;\n"
                       + "".join(f"  {r}\n" for r in rules) + " }\n}\n")
        subprocess.run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"],
                       input=script, text=True, check=True, timeout=10,
                       capture_output=True)

    def rate(self, site: str, mbit: float | None) -> None:
        """Limit host ``site``'s link to ``mbit`` Mbit/s each way (``tbf``);
        None removes the limit."""
        s = self[site]
        if mbit is not None and not mbit > 0:
            raise SitesError(f"rate for site {site!r} must be a positive Mbit/s, not {mbit!r}")
        for ns, dev in ((s.netns, "eth0"), (self.hub, f"to-{site}")):
            if mbit is None:
                cmd = ["tc", "qdisc", "del", "dev", dev, "root"]
            else:
                # burst must hold at least one timer tick's worth of bytes
                # (rate/HZ) or tbf cannot reach the rate; 64 KiB covers 100
                # Mbit/s at HZ=250 and is small next to the transfers tested.
                burst = max(64 << 10, int(mbit * 1e6 / 8 / 100))
                cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                       "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"]
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True,
                           timeout=10, capture_output=True)


def free_port(site) -> int:
    """A port free on ``site``'s address, picked by the kernel inside the
    site (only our own processes live there, so it stays free)."""
    code = ("import socket; s = socket.socket(); s.bind((%r, 0));"
            " print(s.getsockname()[1])" % site.addr)
    return int(site.run([sys.executable, "-c", code], timeout=30).stdout)
