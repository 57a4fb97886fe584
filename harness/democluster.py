"""Cluster mode on the host rig, and ``make demo-cluster``.

    with Hosts(base) as h:
        cl = Cluster(h, ttl_s=4)                # etcd on a1, b1, c; [cluster] text
        h.install(session_text(h) + cl.table())
        h.boot(); cl.start_etcd(); h.enable_nodes()
        cl.enable_mirrors()                      # cgmirror-mirror@SESSION on c, b1, a1
        lead = cl.wait_leader()                  # {"host", "pid", "epoch", ...}
        with cl.watch("b2") as w:                # P/leader and P/state/hardened, as seen
            cl.kill_leader()                     # kill -9 of its unit's main process
            w.wait(lambda s: s.epoch > lead["epoch"] and s.hardened_epoch == s.epoch)

The cluster's parts on the rig of harness/hosts.py:

- **etcd**: three members, one on each of a1, b1 and c (a member per
  site, so that a site cut off leaves the other two a quorum), on each
  host's own address, with the session's PKI: the host's certificate
  directory (``/etc/cgmirror/pki/NAME``) is its server and peer identity,
  the session CA the only trust anchor, client certificates required
  (harness/etcd.py runs them).
- **coordinators**: ``cgmirror-mirror@SESSION`` (the unit install-units
  writes) enabled on c, b1 and a1: one leads, the others stand by.  A
  unit killed -9 is restarted by the host's supervisor (RestartSec=5s) and
  comes back as a standby.
- **reading etcd**: always from inside a host (a client in the machine's
  own namespace would route a site address out of the machine), with the
  coordinator's certificate of that host: ``python -m harness.democluster
  inside STEP ARGS-JSON`` prints one JSON line; ``watch`` prints a line
  each time the leader or the hardened group changes (``Watch``).

``python -m harness.democluster`` (``make demo-cluster``, root) is the demo:
five hosts, the nodes under their units, etcd on a1 b1 c, three
coordinators, a writer at site a; the leader is killed -9, and ``cgmirror
mirror status`` and ``cgmirror events`` (run on b2, a host with no
coordinator: the answer comes from etcd) show the takeover; the checker
reads site b's hardened group.  Exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MEMBERS = ("a1", "b1", "c")
COORDINATORS = ("c", "b1", "a1")
CLIENT_PORT = 2379
PEER_PORT = 2380
SESSION_FILE = "/etc/cgmirror/session.toml"


class ClusterError(Exception):
    """The cluster rig could not do what was asked; the message says why."""


# ------------------------------------------------------------ inside a host

def _etcd():
    """The session's etcd client as a coordinator of this host makes it."""
    from coordinator import session as session_mod
    from wire.etcd import Etcd
    s = session_mod.load(SESSION_FILE)
    if s.cluster is None:
        raise ClusterError(f"{SESSION_FILE} has no [cluster] table")
    return s, Etcd.for_cluster(s.cluster, s.cluster.coordinator_tls)


def _value(kv) -> object:
    if kv is None:
        return None
    try:
        return json.loads(kv.value.decode())
    except ValueError:
        return kv.value.decode(errors="replace")


def read_state(etcd, session: str) -> dict:
    """What the rig looks at: the leader (its value and epoch: the key's
    create revision) and the last hardened group (``state/hardened``)."""
    lead = etcd.get(etcd.key(session, "leader"))
    hard = etcd.get(etcd.key(session, "state", "hardened"))
    return {"leader": _value(lead), "epoch": lead.create_rev if lead else None,
            "hardened": _value(hard)}


def _step_state() -> dict:
    s, etcd = _etcd()
    return read_state(etcd, s.name)


def _step_get(*parts: str) -> dict:
    """One key under the session's prefix: value and revisions (None: absent)."""
    s, etcd = _etcd()
    kv = etcd.get(etcd.key(s.name, *parts))
    return None if kv is None else {"value": _value(kv), "create_rev": kv.create_rev,
                                    "mod_rev": kv.mod_rev, "lease": kv.lease}


def _step_watch(interval: float = 0.05) -> None:
    """Until killed: a JSON line {"t": wall time, ...read_state} each time
    what read_state returns changes, or {"t", "error"} when etcd does not
    answer (once per error text)."""
    from wire.etcd import EtcdError
    s, etcd = _etcd()
    last = None
    while True:
        try:
            now = read_state(etcd, s.name)
        except EtcdError as exc:
            now = {"error": str(exc)}
        key = json.dumps(now, sort_keys=True)
        if key != last:
            print(json.dumps({"t": time.time(), **now}), flush=True)
            last = key
        time.sleep(interval)


def _step_writer(seconds: float, rate: float, seed: int = 1) -> dict:
    """64 KiB writes at random places of every primary volume of the
    session file (its ``[[slave]]`` tables), ``rate`` a second, for
    ``seconds``: how many, the longest, the first error (a writer stops
    at it)."""
    import random

    from coordinator import session as session_mod
    from harness import workload as wl
    s = session_mod.load(SESSION_FILE)
    wl.TLS_DIR = s.slaves[0].client_tls
    uris = [c.spec().uri(v.name) for c in s.slaves for v in c.volumes]
    devs = [wl.Device(u, f"writer-{i}") for i, u in enumerate(uris)]
    rng = random.Random(seed)
    data = rng.randbytes(64 << 10)
    count, longest, error = 0, 0.0, None
    try:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            d = devs[count % len(devs)]
            t = time.monotonic()
            try:
                d.pwrite(data, rng.randrange(d.size >> 16) << 16)
            except Exception as exc:        # nbd.Error: the host would see it
                error = str(exc).splitlines()[0]
                break
            longest = max(longest, time.monotonic() - t)
            count += 1
            time.sleep(max(0.0, start + count / rate - time.monotonic()))
    finally:
        for d in devs:
            d.close()
    return {"count": count, "longest_s": round(longest, 4), "error": error}


# The demo's dependent-write layout: the workload spans both nodes of a
# site, neighbours on different hosts (the host tests' layout).
PLACES = {"a": ("a1/v0", "a2/v0", "a1/v1", "a2/v1"), "b": ("b1/v0", "b2/v0", "b1/v1", "b2/v1")}


def _layout_uris(site: str):
    from coordinator import session as session_mod
    from harness import workload as wl
    s = session_mod.load(SESSION_FILE)
    cfgs = {c.name: c for c in [*s.slaves, *s.secondaries]}
    wl.TLS_DIR = s.slaves[0].client_tls
    size = s.slaves[0].volumes[0].size
    layout = wl.Layout(PLACES["a"], size, writers=2, slots=16, granularity=64 << 10)
    return layout, [cfgs[p.split("/")[0]].spec().uri(p.split("/")[1]) for p in PLACES[site]]


def _step_workload(site: str, records: int) -> dict:
    """``records`` dependent writes per writer at ``site``, from nothing."""
    from harness import workload as wl
    layout, uris = _layout_uris(site)
    work = wl.Workload(uris, layout, max_records=records).start()
    work.join(300).stop()
    if work.errors:
        raise ClusterError(f"workload at site {site}: {work.errors}")
    return {"acked": work.acked}


def _step_check(site: str) -> dict:
    """The dependent-write checker on ``site``'s host exports."""
    from harness import workload as wl
    layout, uris = _layout_uris(site)
    rep = wl.check_targets(uris, layout)
    return {"ok": rep.ok, "summary": rep.summary(), "heads": rep.heads}


STEPS = {"state": _step_state, "get": _step_get, "writer": _step_writer,
         "workload": _step_workload, "check": _step_check}


def _inside(argv: list[str]) -> int:
    step, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else []
    if step == "watch":
        _step_watch(*args)
        return 0
    print(json.dumps(STEPS[step](*args)))
    return 0


# ------------------------------------------------------------ the rig's side

class Seen:
    """One line of a ``Watch``: what etcd held at wall time ``t``."""

    def __init__(self, doc: dict):
        self.t = doc["t"]
        self.error = doc.get("error")
        self.leader = doc.get("leader") or {}
        self.epoch = doc.get("epoch")
        self.hardened = doc.get("hardened") or {}

    @property
    def hardened_epoch(self) -> int | None:
        return self.hardened.get("epoch")

    @property
    def n(self) -> int:
        return self.hardened.get("n") or 0

    def __repr__(self) -> str:
        if self.error:
            return f"Seen(t={self.t:.3f}, error={self.error!r})"
        return (f"Seen(t={self.t:.3f}, leader={self.leader.get('host')}/"
                f"{self.leader.get('pid')} epoch={self.epoch}, hardened n={self.n}"
                f" epoch={self.hardened_epoch})")


class Watch:
    """``watch`` running inside a host; ``seen`` fills as lines arrive."""

    def __init__(self, host):
        self.host = host
        self.seen: list[Seen] = []
        self.cond = threading.Condition()
        self.proc = host.popen([sys.executable, "-m", "harness.democluster", "inside", "watch"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, name="cluster-watch", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.seen.append(Seen(doc))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def last(self) -> Seen | None:
        with self.cond:
            return self.seen[-1] if self.seen else None

    def wait(self, pred, timeout: float, what: str = "the condition") -> Seen:
        """The first line from now on (the current one included) for which
        ``pred(seen)`` holds; ClusterError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = max(len(self.seen) - 1, 0)
            while True:
                while i < len(self.seen):
                    if pred(self.seen[i]):
                        return self.seen[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    err = "" if self.proc.poll() is None else \
                        f" (watch exited {self.proc.returncode}: {self.proc.stderr.read()[-500:]})"
                    raise ClusterError(f"{what} not seen in {timeout:g} s{err};"
                                       f" last: {self.seen[-3:]}")
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.reader.join(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        if self.proc in self.host.procs:
            self.host.procs.remove(self.proc)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Cluster:
    """etcd and coordinators on a ``harness.hosts.Hosts`` rig (module doc)."""

    def __init__(self, hosts, ttl_s: int = 4, fence: str = "none",
                 lease_ttl_s: int | None = None, members=MEMBERS,
                 coordinators=COORDINATORS):
        self.h, self.ttl_s, self.fence = hosts, ttl_s, fence
        self.lease_ttl_s = lease_ttl_s
        self.members, self.coordinators = tuple(members), tuple(coordinators)
        self.etcd = None            # harness.etcd's cluster, once started

    @property
    def unit(self) -> str:
        return f"cgmirror-mirror@{self.h.session}.service"

    def endpoints(self) -> list[str]:
        return [f"https://{self.h[m].addr}:{CLIENT_PORT}" for m in self.members]

    def table(self) -> str:
        """The session file's ``[cluster]`` table."""
        keys = {"etcd": self.endpoints(), "ttl_s": self.ttl_s, "fence": self.fence}
        if self.lease_ttl_s is not None:
            keys["lease_ttl_s"] = self.lease_ttl_s
        return "\n[cluster]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())

    # -- etcd

    def start_etcd(self, timeout: float = 60) -> None:
        """Every member up (each inside its host, data and certificates in
        the rig's base), the cluster healthy."""
        from harness.etcd import EtcdCluster
        self.etcd = EtcdCluster(os.path.join(self.h.base, "etcd"), self.h.pki,
                                hosts=[self.h[m] for m in self.members],
                                session=self.h.session)
        self.etcd.__enter__()
        self.etcd.wait_healthy(timeout)

    def _member(self, name: str) -> int:
        try:
            return self.members.index(name)
        except ValueError:
            raise ClusterError(f"no etcd member on host {name} (members:"
                               f" {', '.join(self.members)})") from None

    def _started(self):
        if self.etcd is None:
            raise ClusterError("etcd is not started on the rig (Cluster.start_etcd)")
        return self.etcd

    def member_running(self, name: str) -> bool:
        i = self._member(name)
        return self._started()[i].running

    def kill_member(self, name: str) -> None:
        """kill -9 of host ``name``'s etcd member (its data stays)."""
        i = self._member(name)
        self._started().kill(i)

    def start_member(self, name: str) -> None:
        """Start host ``name``'s member again on its data (``wait_healthy``
        waits until it has rejoined a quorum)."""
        i = self._member(name)
        if not self._started()[i].running:
            self.etcd.start(i)

    def wait_healthy(self, timeout: float = 60) -> None:
        self._started().wait_healthy(timeout)

    # -- coordinators

    def enable_mirrors(self, hosts=None) -> None:
        """``systemctl enable --now cgmirror-mirror@SESSION`` on ``hosts``
        (default: every coordinator host), in order; install-units first
        where the host has none."""
        for name in hosts or self.coordinators:
            host = self.h[name]
            if not os.path.exists(host.file(f"/etc/systemd/system/cgmirror-mirror@.service")):
                host.cgmirror("install-units", check=True)
            host.enable(self.unit)

    def disable_mirror(self, name: str, timeout: float = 60) -> None:
        """``systemctl disable --now`` the mirror on host ``name`` (SIGTERM:
        a leader resigns) and wait until it is gone."""
        host = self.h[name]
        host.disable(self.unit)
        deadline = time.monotonic() + timeout
        while host.unit(self.unit) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.unit} on {name} not stopped in {timeout:g} s")
            time.sleep(0.05)

    def mirror_pid(self, name: str) -> int | None:
        u = self.h[name].unit(self.unit)
        return u["pid"] if u else None

    def inside(self, host: str, step: str, *args, timeout: float = 60):
        """Step ``step`` (module doc) inside ``host``; its JSON result."""
        r = self.h[host].python("-m", "harness.democluster", "inside", step, json.dumps(args),
                                timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"{step} inside {host} exited {r.returncode}:"
                               f" {r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def state(self, host: str = "b2") -> dict:
        return self.inside(host, "state")

    def watch(self, host: str = "b2") -> Watch:
        return Watch(self.h[host])

    def leader_host(self, lead: dict) -> str:
        """Which host runs the leader ``lead`` (its value in etcd): the
        coordinator host whose mirror unit has that pid."""
        for name in self.coordinators:
            if self.mirror_pid(name) == lead.get("pid"):
                return name
        raise ClusterError(f"leader {lead} runs under no mirror unit of"
                           f" {', '.join(self.coordinators)}")

    def wait_leader(self, watch: Watch, timeout: float = 60, other_than: int | None = None,
                    hardened: bool = True) -> Seen:
        """The first leader (with an epoch above ``other_than``) seen by
        ``watch``, once (``hardened``) it has hardened a group of its own."""
        def ok(s: Seen) -> bool:
            return (not s.error and s.epoch is not None
                    and (other_than is None or s.epoch > other_than)
                    and (not hardened or s.hardened_epoch == s.epoch))
        return watch.wait(ok, timeout, "a leader" + (" that hardened a group" if hardened
                                                     else ""))


# ------------------------------------------------------------ the demo

def demo(base: str) -> bool:
    from harness.hosts import Hosts, session_text
    checks: list[tuple[str, bool]] = []

    def say(text: str) -> None:
        print(f"\n# {text}", flush=True)

    def show(host, *args) -> subprocess.CompletedProcess:
        print(f"\n[{host.name}]$ cgmirror {' '.join(args)}", flush=True)
        r = host.cgmirror(*args, timeout=120)
        sys.stdout.write(r.stdout)
        sys.stdout.write("".join(x + "\n" for x in r.stderr.splitlines()
                                 if x.startswith("cgmirror")))
        sys.stdout.flush()
        return r

    with Hosts(base, session="demo") as h:
        cl = Cluster(h, ttl_s=5)
        text = session_text(h, mirror={"interval_ms": 500, "max_drain_ms": 5000},
                            copy_timeout_ms=5000) + cl.table()
        say("hosts a1 a2 (primaries), b1 b2 (secondaries), c; the session file on every"
            " host:")
        print(text)
        h.install(text)
        h.boot()
        say(f"etcd: one member on each of {', '.join(cl.members)} (TLS from the session's"
            " CA)")
        cl.start_etcd()
        say("nodes under their units (cgmirror-node@NAME) on a1 a2 b1 b2")
        h.enable_nodes()
        say(f"three coordinators: {cl.unit} on {', '.join(cl.coordinators)}")
        cl.enable_mirrors()
        with cl.watch("b2") as w:
            first = cl.wait_leader(w, timeout=120)
            lead_host = cl.leader_host(first.leader)
            say(f"the leader: {lead_host} (pid {first.leader.get('pid')}), epoch"
                f" {first.epoch}; group {first.n} hardened by it")
            writer = h["a1"].popen([sys.executable, "-m", "harness.democluster", "inside",
                                    "workload", json.dumps(["a", 400])],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            try:
                w.wait(lambda s: s.n >= first.n + 2, 60, "two more groups")
                show(h["b2"], "mirror", "status")
                say(f"kill -9 the leader's coordinator on {lead_host}")
                t0 = time.time()
                h[lead_host].kill_unit(cl.unit, signal.SIGKILL)
                new = cl.wait_leader(w, timeout=cl.ttl_s + 60, other_than=first.epoch)
                took = new.t - t0
                new_host = cl.leader_host(new.leader)
                say(f"{new_host} leads (epoch {new.epoch}) and hardened group {new.n}"
                    f" {took:.1f} s after the kill (ttl {cl.ttl_s} s)")
                checks.append((f"a standby ({new_host}) took over and hardened a group"
                               f" {took:.1f} s after the kill (ttl_s {cl.ttl_s})",
                               new_host != lead_host and new.epoch > first.epoch))
            finally:
                out, err = writer.communicate(timeout=300)
            checks.append(("the writer at site a ran through the takeover",
                           writer.returncode == 0))
            if writer.returncode != 0:
                print(err[-2000:])
            w.wait(lambda s: s.n > new.n, 60, "one more group")
            say("b2 runs no coordinator: what it shows comes from etcd")
            show(h["b2"], "mirror", "status")
            r = h["b2"].cgmirror("mirror", "status", "--json", timeout=120)
            doc = json.loads(r.stdout) if r.returncode == 0 else {}
            lead = (doc.get("cluster") or {}).get("leader") or {}
            checks.append((f"`mirror status` on b2 names the new leader (pid {lead.get('pid')},"
                           f" epoch {lead.get('epoch')})",
                           (lead.get("pid"), lead.get("epoch")) == (new.leader.get("pid"),
                                                                    new.epoch)))
            print(f"\n[b2]$ cgmirror events --once | grep -E '\"event\":\"(leader|standby)\"'",
                  flush=True)
            r = h["b2"].cgmirror("events", "--once", timeout=120)
            events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            leads = [e for e in events if e.get("event") in ("leader", "standby")]
            for e in leads:
                print(json.dumps(e, separators=(",", ":")))
            checks.append((f"`events` on b2 shows the takeover (a `leader` event of epoch"
                           f" {new.epoch}, after epoch {first.epoch})",
                           r.returncode == 0 and any(
                               e.get("event") == "leader" and e.get("epoch") == new.epoch
                               and (e.get("previous") or {}).get("epoch") == first.epoch
                               for e in leads)))
            rep = cl.inside("b1", "check", "b", timeout=120)
            checks.append((f"site b's hardened group passes the dependent-write checker:"
                           f" {rep.get('summary')}", bool(rep.get("ok"))))
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return bool(checks) and all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inside"]:
        return _inside(argv[1:])
    p = argparse.ArgumentParser(prog="python -m harness.democluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo-cluster: needs root (network and mount namespaces)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="cgmirror-demo-cluster-")
    try:
        ok = demo(base)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("\ndemo-cluster " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
