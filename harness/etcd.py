"""A real etcd cluster for tests, benchmarks and demos: N members of
Debian's etcd-server, mutual TLS on client and peer ports from a session's
PKI, data under a directory the caller gives.

    with EtcdCluster(base, pki_dir, n=3) as etcd:          # loopback
        etcd.wait_healthy(20)
        client = Etcd(etcd.endpoints(), etcd.client_dir)
        etcd.kill(0)            # SIGKILL member 0 by its pid
        etcd.start(0)           # back, from its data dir
        etcd.wait_healthy(20)

    with Hosts(base) as h, EtcdCluster(base, h.pki, hosts=[h["a1"], h["b1"], h["c"]]) as etcd:
        ...                     # member i runs inside host i, on the host's address

Two placements:

- loopback (``hosts=None``): every member on 127.0.0.1, its client and peer
  ports picked free by the kernel at start; no namespace, no root needed.
- hosts (``hosts=[...]``): member i runs inside ``hosts[i]`` (a
  harness.hosts.Host, or a harness.sites.Site: anything with ``addr``,
  ``popen`` and ``run``), listening on that host's address on etcd's usual
  ports 2379 (clients) and 2380 (peers): each host is a private namespace
  where nothing else listens.  Its health is checked from inside the host
  (etcdctl), never from the machine's own namespace.

Certificates: member NAME gets ``PKI/etcd-NAME`` (coordinator.pki.issue,
its IP address and "localhost"), used as server and peer certificate (EKU
serverAuth + clientAuth); ``client_dir`` (``PKI/etcd-client``, 127.0.0.1)
is a client certificate for loopback tests.  A PKI directory without a CA
gets one (``session`` names it).  Existing certificates are reused, so a rig
may stop and start the cluster in one base.

Timeouts are tight for tests (heartbeat 100 ms, election 1000 ms): a leader
is elected within about a second of a member's death.  Every process is
started here and ended here by its pid (SIGTERM then SIGKILL, or SIGKILL for
``kill``); ``close`` (the context manager's exit) ends all of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from coordinator import pki
from wire import tls

ETCD = "etcd"
ETCDCTL = "etcdctl"
CLIENT_PORT = 2379
PEER_PORT = 2380
HEARTBEAT_MS = 100
ELECTION_MS = 1000


class EtcdRigError(Exception):
    """The rig could not start or check its etcd members (one line)."""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all bound at once, so
    they differ; released just before etcd binds them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Member:
    """One etcd member: where it listens, its files and its process."""

    def __init__(self, index: int, name: str, addr: str, client_port: int,
                 peer_port: int, data_dir: str, cert_dir: str, host=None):
        self.index, self.name, self.addr = index, name, addr
        self.client_port, self.peer_port = client_port, peer_port
        self.data_dir, self.cert_dir, self.host = data_dir, cert_dir, host
        self.proc: subprocess.Popen | None = None
        self.log = data_dir + ".log"

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.client_url})"

    @property
    def client_url(self) -> str:
        return f"https://{self.addr}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.addr}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """N etcd members with TLS from a session PKI (see the module doc)."""

    def __init__(self, base: str, pki_dir: str, n: int = 3, hosts=None,
                 session: str = "etcd", heartbeat_ms: int = HEARTBEAT_MS,
                 election_ms: int = ELECTION_MS, token: str | None = None):
        if hosts is not None:
            hosts = list(hosts)
            n = len(hosts)
        if not 1 <= n <= 7:
            raise EtcdRigError(f"an etcd cluster of 1 to 7 members, not {n}")
        self.base = os.path.abspath(base)
        self.pki = pki_dir
        self.hosts = hosts
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        # A cluster token of its own, so members of two rigs never join.
        self.token = token or f"cgmirror-test-{os.getpid()}-{time.monotonic_ns()}"
        os.makedirs(self.base, exist_ok=True)
        if not os.path.exists(os.path.join(pki_dir, tls.CA_CERT)):
            pki.init(pki_dir, session)
        self.members: list[Member] = []
        ports = _free_ports(2 * n) if hosts is None else None
        for i in range(n):
            if hosts is None:
                name, addr = f"m{i}", "127.0.0.1"
                cport, pport = ports[2 * i], ports[2 * i + 1]
            else:
                name, addr = hosts[i].name, hosts[i].addr
                cport, pport = CLIENT_PORT, PEER_PORT
            cert = self._cert(f"etcd-{name}", addr)
            self.members.append(Member(i, name, addr, cport, pport,
                                       os.path.join(self.base, f"etcd-{name}"), cert,
                                       None if hosts is None else hosts[i]))
        self.client_dir = self._cert("etcd-client", "127.0.0.1")

    def _cert(self, name: str, addr: str) -> str:
        d = os.path.join(self.pki, name)
        if not os.path.isdir(d):
            pki.issue(self.pki, name, dns=["localhost"], ips=[addr])
        return d

    # -- the cluster -------------------------------------------------------

    def __enter__(self) -> "EtcdCluster":
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> Member:
        return self.members[i]

    def __len__(self) -> int:
        return len(self.members)

    def endpoints(self) -> list[str]:
        """Every member's client URL (``https://ADDR:PORT``), in member order."""
        return [m.client_url for m in self.members]

    def start_all(self) -> None:
        """Start every member that is not running (they elect a leader
        together; ``wait_healthy`` waits for it)."""
        for i, m in enumerate(self.members):
            if not m.running:
                self.start(i)

    def close(self) -> None:
        """End every member (SIGTERM, then SIGKILL) and reap it."""
        for i in range(len(self.members)):
            self.stop(i)

    # -- one member ----------------------------------------------------------

    def command(self, i: int) -> list[str]:
        """The etcd command line of member ``i``."""
        m = self.members[i]
        f = tls.HostFiles(m.cert_dir)
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        return [ETCD, "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", m.client_url,
                "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url,
                "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token,
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--client-cert-auth", "--trusted-ca-file", f.ca,
                "--cert-file", f.server_cert, "--key-file", f.server_key,
                "--peer-client-cert-auth", "--peer-trusted-ca-file", f.ca,
                "--peer-cert-file", f.server_cert, "--peer-key-file", f.server_key,
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]

    def start(self, i: int) -> Member:
        """Start member ``i`` (from its data directory if it has one)."""
        m = self.members[i]
        if m.running:
            raise EtcdRigError(f"etcd member {m.name} is already running (pid {m.pid})")
        os.makedirs(m.data_dir, mode=0o700, exist_ok=True)
        os.chmod(m.data_dir, 0o700)         # etcd 3.4 insists
        with open(m.log, "ab") as log:
            kw = dict(stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if m.host is None:
                m.proc = subprocess.Popen(self.command(i), **kw)
            else:
                m.proc = m.host.popen(self.command(i), **kw)
        return m

    def stop(self, i: int, timeout: float = 10) -> int | None:
        """SIGTERM member ``i``, SIGKILL it after ``timeout``; its exit status."""
        m = self.members[i]
        if m.proc is None:
            return None
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            m.proc.send_signal(signal.SIGCONT)     # a paused member takes it too
            try:
                m.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout)
        return m.proc.returncode

    def kill(self, i: int, timeout: float = 10) -> None:
        """SIGKILL member ``i`` by its pid and reap it."""
        m = self.members[i]
        if m.running:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout)

    def restart(self, i: int) -> Member:
        """Stop member ``i`` (SIGTERM) and start it again from its data."""
        self.stop(i)
        return self.start(i)

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i`` (alive, silent: its peers and clients time out)."""
        m = self.members[i]
        if not m.running:
            raise EtcdRigError(f"etcd member {m.name} is not running")
        os.kill(m.proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """SIGCONT member ``i``."""
        m = self.members[i]
        if m.running:
            os.kill(m.proc.pid, signal.SIGCONT)

    # -- health --------------------------------------------------------------

    def healthy(self, i: int, timeout: float = 1.0) -> bool:
        """Member ``i`` answers a linearizable read (it has a leader and a
        quorum), asked from where a client of its placement sits."""
        m = self.members[i]
        if not m.running:
            return False
        if m.host is None:
            from wire.etcd import Etcd, EtcdError
            with Etcd([m.client_url], self.client_dir, timeout=timeout) as client:
                try:
                    client.revision()
                    return True
                except EtcdError:
                    return False
        try:
            r = m.host.run(self._etcdctl(m, timeout) + ["endpoint", "health"],
                           timeout=timeout + 10, check=False,
                           env={**os.environ, "ETCDCTL_API": "3"})
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def status(self, i: int, timeout: float = 1.0) -> dict | None:
        """Member ``i``'s ``{"member_id", "leader"}`` (raft ids; leader 0:
        none known), asked from where a client of its placement sits; None if
        it does not answer."""
        m = self.members[i]
        if not m.running:
            return None
        if m.host is None:
            from wire.etcd import Etcd, EtcdError
            with Etcd([m.client_url], self.client_dir, timeout=timeout) as client:
                try:
                    st = client.status()
                except EtcdError:
                    return None
            return {"member_id": st["member_id"], "leader": st.get("leader", 0)}
        try:
            r = m.host.run(self._etcdctl(m, timeout) + ["-w", "json", "endpoint", "status"],
                           timeout=timeout + 10, check=False,
                           env={**os.environ, "ETCDCTL_API": "3"})
            st = json.loads(r.stdout)[0]["Status"] if r.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError, LookupError):
            return None
        if st is None:
            return None
        return {"member_id": int(st["header"]["member_id"]), "leader": int(st.get("leader", 0))}

    def leader(self, timeout: float = 10) -> int:
        """The index of the member that leads the raft now: the one a
        majority of all members name (a member cut off may still name
        itself or none); waits up to ``timeout`` s for one."""
        deadline = time.monotonic() + timeout
        while True:
            ids, votes = {}, {}
            for i in range(len(self.members)):
                st = self.status(i)
                if st is not None:
                    ids[st["member_id"]] = i
                    if st["leader"]:
                        votes[st["leader"]] = votes.get(st["leader"], 0) + 1
            for leader, n in votes.items():
                if n > len(self.members) // 2 and leader in ids:
                    return ids[leader]
            if time.monotonic() > deadline:
                raise EtcdRigError(f"no etcd leader named by a majority of the"
                                   f" {len(self.members)} members after {timeout:.0f} s")
            time.sleep(0.05)

    def _etcdctl(self, m: Member, timeout: float) -> list[str]:
        f = tls.HostFiles(m.cert_dir)
        return [ETCDCTL, "--endpoints", m.client_url, "--cacert", f.ca,
                "--cert", f.client_cert, "--key", f.client_key,
                f"--command-timeout={timeout}s"]

    def wait_healthy(self, timeout: float = 30, members=None) -> None:
        """Wait until every running member (or every one in ``members``,
        which must run) is healthy.  EtcdRigError naming the others and
        their log's tail if not within ``timeout`` s, at once if a member
        exits meanwhile (e.g. its port was taken) or none runs."""
        idx = list(range(len(self.members))) if members is None else list(members)
        running = {i for i in idx if self.members[i].running}
        if members is None and not running:
            raise EtcdRigError("no etcd member is running")
        deadline = time.monotonic() + timeout
        while True:
            exited = [i for i in running if not self.members[i].running]
            if exited:
                raise EtcdRigError("etcd member exited: " + ", ".join(map(self._why, exited)))
            waiting = [i for i in idx
                       if self.members[i].running and not self.healthy(i)]
            dead = [i for i in idx if not self.members[i].running and members is not None]
            if not waiting and not dead:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self._why(i) for i in waiting + dead)
                raise EtcdRigError(f"etcd not healthy after {timeout:.0f} s: {names}")
            time.sleep(0.05)

    def _why(self, i: int) -> str:
        m = self.members[i]
        state = ("running" if m.running else "never started" if m.proc is None
                 else f"exited {m.proc.returncode}")
        return f"{m.name} ({state}; {_tail(m.log)})"


def _tail(path: str, lines: int = 2) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-4000:]
    except OSError:
        return "no log"
    return " | ".join(text.strip().splitlines()[-lines:]) or "empty log"


def main(argv: list[str]) -> int:
    """``python -m harness.etcd BASE [N]``: a loopback cluster until Ctrl-C."""
    base = argv[0] if argv else "etcd-rig"
    n = int(argv[1]) if len(argv) > 1 else 3
    with EtcdCluster(base, os.path.join(base, "pki"), n=n) as c:
        c.wait_healthy(30)
        print(" ".join(c.endpoints()), c.client_dir, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
