"""Simulated sites (harness/sites.py): real namespaces, real nbdkit, real libnbd.

Every NBD client here runs inside a site, never in the root namespace (whose
default route would carry a site address off the machine).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from cgtest import need, need_netns, wait_until
from harness.sites import PREFIX, Sites, SitesError, list_ours, listen_ports, stop, sweep_stale

# Seconds an NBD client command waits before it reports "timeout".
LIMIT = 2.0

# The client runs inside a site under sys.executable (which sees the `nbd`
# module).  It reads one command a line and answers one line:
# 'ok SECONDS' or 'timeout SECONDS'.
CLIENT = r'''
import sys, time, nbd
uri, limit = sys.argv[1], float(sys.argv[2])
h = nbd.NBD()
h.set_handle_name("site-client")
inflight = []

def settle(t0):
    """Run the handle until nothing is in flight, or give up at t0 + limit
    (leaving the requests in flight: 'wait' picks them up again)."""
    while True:
        # aio_command_completed raises nbd.Error if the server failed it.
        inflight[:] = [c for c in inflight if not h.aio_command_completed(c)]
        if h.aio_is_dead():
            sys.exit("connection died")
        if not inflight and (h.aio_is_ready() or h.aio_is_processing()):
            return True
        if time.monotonic() - t0 > limit:
            return False
        h.poll(50)

for line in sys.stdin:
    cmd, *args = line.split()
    t0 = time.monotonic()
    if cmd == "connect":
        h.aio_connect_uri(uri)
        done = settle(t0)
    elif cmd == "rw":
        seq, length = int(args[0]), int(args[1])
        data = (b"%08d" % seq) * (length // 8)
        # A connect or earlier command still under way finishes first.  The
        # read is issued only once the write is acknowledged: NBD does not
        # order overlapping requests that are in flight together.
        done = settle(t0)
        if done:
            inflight.append(h.aio_pwrite(data, 0))
            done = settle(t0)
        if done:
            buf = nbd.Buffer(len(data))
            inflight.append(h.aio_pread(buf, 0))
            done = settle(t0)
            if done and buf.to_bytearray() != data:
                sys.exit(f"read back differs for pattern {seq}")
    elif cmd == "wait":
        done = settle(t0)
    else:
        sys.exit(f"unknown command {cmd!r}")
    print("ok" if done else "timeout", round(time.monotonic() - t0, 3), flush=True)
'''


def nbd_server(site, size: str = "64M") -> tuple[subprocess.Popen, str]:
    """An nbdkit memory server listening on TCP at ``site``; returns it and its URI."""
    need("nbdkit")
    srv = site.popen(["nbdkit", "-f", "--exit-with-parent", "-p", "0", "-i", site.addr,
                      "memory", size])
    return srv, f"nbd://{site.addr}:{site.wait_port(srv)}"


def probe(site, uri: str, length: int = 4096) -> tuple[str, float]:
    """One fresh client in ``site``: connect, write, read back.  Returns the
    last answer ('ok'/'timeout') and the wall time the client took."""
    t0 = time.monotonic()
    out = site.run([sys.executable, "-c", CLIENT, uri, str(LIMIT)],
                   input=f"connect\nrw 1 {length}\n", timeout=4 * LIMIT + 30,
                   check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-2], time.monotonic() - t0


def ask(client: subprocess.Popen, line: str, timeout: float) -> tuple[str, float]:
    """Send one command to a long-lived client and read its answer."""
    client.stdin.write(line + "\n")
    client.stdin.flush()
    ready, _, _ = select.select([client.stdout], [], [], timeout)
    assert ready, f"client did not answer {line!r} within {timeout} s"
    answer = client.stdout.readline().split()
    assert answer, f"client exited with {client.wait(5)} on {line!r}"
    return answer[0], float(answer[1])


def list_ours_of(net: Sites) -> list[str]:
    """The namespaces of ``net`` that exist now."""
    return [n for n in list_ours() if n.startswith(net.tag + "-")]


def _gone(pid: int) -> bool:
    """True if ``pid`` has exited (missing, or a zombie its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _comm(pid: int) -> str:
    """The command name of process ``pid``."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


# -- pure parts, no namespaces ------------------------------------------------

def test_bad_site_name_is_refused():
    """A name that could not be part of an interface name is refused with the rule."""
    with pytest.raises(SitesError, match="bad site name 'A-1'"):
        Sites(("a", "A-1"))


def test_repeated_site_name_is_refused():
    """Two sites of one name are refused."""
    with pytest.raises(SitesError, match="repeat"):
        Sites(("a", "a"))


def test_subnet_too_small_is_refused():
    """A subnet without an address for every host is refused."""
    with pytest.raises(SitesError, match="no room for 3 hosts"):
        Sites(("a", "b", "c"), subnet="10.213.0.0/30")


def test_two_hosts_fit_a_slash_30():
    """A /30 holds exactly two hosts."""
    assert Sites(("a", "b"), subnet="10.213.0.0/30").names == ["a", "b"]


def test_listen_ports_sees_a_listening_socket_of_the_process():
    """A socket the process listens on is found; once closed it is not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert port not in listen_ports(os.getpid())
        s.listen()
        assert port in listen_ports(os.getpid())
    assert port not in listen_ports(os.getpid())


def test_listen_ports_of_a_gone_process_is_empty():
    """A process that has exited listens on nothing (no error)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert listen_ports(proc.pid) == set()


def test_stop_kills_a_process_that_ignores_sigterm():
    """stop() falls back to SIGKILL and reaps."""
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 600"])
    try:
        # Ignoring TERM is set before exec; wait until sleep runs.
        wait_until(lambda: _comm(proc.pid) == "sleep", what="sleep to start")
        assert stop(proc, timeout=0.5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- namespaces -----------------------------------------------------------------

def _root_view() -> dict:
    """Links, addresses and routes of the root namespace (read, not probed)."""
    def ip(*args):
        return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True,
                                         text=True, check=True, timeout=10).stdout)
    return {"links": sorted(link["ifname"] for link in ip("link")),
            "addrs": sorted(a["local"] for i in ip("addr") for a in i["addr_info"]),
            "routes": sorted(json.dumps(r, sort_keys=True) for r in ip("route"))}


def test_every_host_reaches_every_other(sites):
    """Each of a, b, c, r reaches an NBD server in each of the others over TCP."""
    need("nbdinfo")
    uris = {s.name: nbd_server(s, "1M")[1] for s in sites}
    for client in sites:
        for server in sites:
            if server is not client:
                out = client.run(["nbdinfo", "--size", uris[server.name]], timeout=30)
                assert out.stdout.strip() == str(1 << 20), (client, server)


def test_sites_are_isolated_from_the_root_namespace():
    """The root namespace gains no link, address or route, so its path to a
    site address is the one it had before (off the machine: never used); the
    sites have no route off their subnet.  Routing tables only: no packet."""
    need_netns()
    before = _root_view()
    with Sites(("a", "r"), subnet="10.213.7.0/24") as net:
        assert _root_view() == before
        for site in net:
            routes = json.loads(site.run(["ip", "-j", "route"]).stdout)
            assert [r["dst"] for r in routes] == ["10.213.7.0/24"], routes
            # Any address off the subnet, e.g. the root namespace's own ones.
            for addr in before["addrs"] + ["192.0.2.1", "8.8.8.8"]:
                if ":" in addr or addr.startswith("127."):
                    continue
                out = site.run(["ip", "route", "get", addr], check=False)
                assert out.returncode != 0 and "unreachable" in out.stderr, (site, addr)
        got = json.loads(subprocess.run(["ip", "-j", "route", "get", net["r"].addr],
                                        capture_output=True, text=True, check=True,
                                        timeout=10).stdout)
        assert got[0]["dev"] in before["links"] and got[0].get("type") != "local"
    assert _root_view() == before


def test_cut_fails_a_new_client_and_heal_restores_it(sites):
    """Cut a-r: a's client times out within its limit while b still reaches r;
    after the heal a fresh client from a succeeds."""
    a, b, r = sites["a"], sites["b"], sites["r"]
    _, uri = nbd_server(r)
    assert probe(a, uri)[0] == "ok"
    sites.cut("a", "r")
    answer, took = probe(a, uri)
    assert answer == "timeout"
    assert took < LIMIT + 20       # the client gave up; it did not hang
    assert probe(b, uri)[0] == "ok"   # a cut is between two hosts only
    sites.heal("a", "r")
    # A fresh connection has no TCP backoff to wait out: a few tries at most.
    answers = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(answers) < 5:
        answers.append(probe(a, uri)[0])
        if answers[-1] == "ok":
            break
    assert answers[-1] == "ok", answers


def test_connection_survives_a_cut(sites):
    """A connection open across a cut stalls during it and completes the
    stalled write and read after the heal, on the same connection."""
    a, r = sites["a"], sites["r"]
    _, uri = nbd_server(r)
    client = a.popen([sys.executable, "-c", CLIENT, uri, str(LIMIT)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert ask(client, "connect", LIMIT + 20)[0] == "ok"
    assert ask(client, "rw 1 65536", LIMIT + 20)[0] == "ok"
    sites.cut("a", "r")
    assert ask(client, "rw 2 65536", LIMIT + 20)[0] == "timeout"
    sites.heal("a", "r")
    # TCP retransmits with backoff: recovery can lag the heal by seconds.
    answer, took = ask(client, "wait", LIMIT + 20)
    while answer == "timeout" and took < 30:
        answer, more = ask(client, "wait", LIMIT + 20)
        took += more
    assert answer == "ok", f"no recovery {took:.1f} s after the heal"
    assert ask(client, "rw 3 65536", LIMIT + 20)[0] == "ok"
    client.stdin.close()
    assert client.wait(10) == 0


def test_rate_limits_a_host_link_both_ways(sites):
    """rate() puts tbf on both ends of the host's link; 2 MiB written and read
    back at 16 Mbit/s cannot take less than 1 s; rate(None) removes it."""
    a, r = sites["a"], sites["r"]
    _, uri = nbd_server(r)
    sites.rate("r", 16)
    for ns, dev in ((r.netns, "eth0"), (sites.hub, "to-r")):
        qdiscs = json.loads(subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "-j", "qdisc", "show", "dev", dev],
            capture_output=True, text=True, check=True, timeout=10).stdout)
        assert [q["kind"] for q in qdiscs] == ["tbf"], (ns, qdiscs)
    client = a.popen([sys.executable, "-c", CLIENT, uri, "60"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert ask(client, "connect", 90)[0] == "ok"
    answer, took = ask(client, f"rw 1 {2 << 20}", 90)
    # 2 MiB each way at 2 MB/s is 2 s; 1 s leaves room for the 64 KiB bursts.
    assert answer == "ok" and took >= 1.0, took
    sites.rate("r", None)
    out = r.run(["tc", "-j", "qdisc", "show", "dev", "eth0"])
    assert "tbf" not in out.stdout


def _netns_of_this_process() -> list[str]:
    """The namespaces named for this test run (other runs on the machine,
    other checkouts' included, make and remove their own meanwhile)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    mine = f"{PREFIX}{os.getpid()}-"
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(mine))


def test_teardown_leaves_nothing_even_when_the_test_fails():
    """A failing test body still ends with every process reaped, a process
    left behind by a tracked one killed, and every namespace gone."""
    need_netns()
    need("nbdkit")
    before = _netns_of_this_process()
    with pytest.raises(RuntimeError, match="test body failed"):
        with Sites(("x", "y"), subnet="10.213.9.0/24") as net:
            srv, _ = nbd_server(net["y"])
            # A daemon outside our tracking: its shell exits at once.
            stray = int(net["x"].run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"]
                                     ).stdout)
            assert len(list_ours_of(net)) == 3
            raise RuntimeError("test body failed")
    assert srv.returncode is not None
    wait_until(lambda: _gone(stray), 10, f"stray pid {stray} to go")
    assert list_ours_of(net) == []
    assert _netns_of_this_process() == before


def test_namespaces_of_a_dead_test_run_are_swept():
    """A namespace named for a process that no longer exists is removed."""
    need_netns()
    from pyroute2 import netns
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"cgmns-{dead.pid}-0-a"
    netns.create(name)
    try:
        assert name in list_ours()
        assert name in sweep_stale()
        assert name not in list_ours()
    finally:
        if name in list_ours():
            netns.remove(name)


def test_namespaces_of_a_live_test_run_are_kept(sites):
    """sweep_stale leaves the namespaces of a running test (this one) alone."""
    removed = sweep_stale()
    assert not any(n.startswith(sites.tag + "-") for n in removed)
    assert len(list_ours_of(sites)) == 5


def test_four_hosts_setup_and_teardown_time():
    """Setup and teardown of a, b, c, r (report the time; bound only catches hangs)."""
    need_netns()
    t0 = time.monotonic()
    with Sites() as net:
        t1 = time.monotonic()
        assert len(list_ours_of(net)) == 5
    t2 = time.monotonic()
    print(f"4-host sites: setup {t1 - t0:.3f} s, teardown {t2 - t1:.3f} s")
    assert t2 - t0 < 30


def test_heal_of_one_pair_leaves_another_cut(sites):
    """With a-r and b-r cut, healing a-r restores a and leaves b cut off; b,
    which never spoke to r, sees a silent timeout like a WAN cut, not a
    'no route to host' from failed ARP."""
    _, uri = nbd_server(sites["r"])
    sites.cut("a", "r")
    sites.cut("b", "r")
    sites.heal("a", "r")
    assert probe(sites["a"], uri)[0] == "ok"
    assert probe(sites["b"], uri)[0] == "timeout"
    assert probe(sites["c"], uri)[0] == "ok"


def test_cut_of_an_unknown_site_is_refused(sites):
    """cut() names the sites there are when given one that is not."""
    with pytest.raises(SitesError, match=r"no site 'zz'; sites are \['a', 'b', 'c', 'r'\]"):
        sites.cut("a", "zz")


def test_cut_of_a_site_from_itself_is_refused(sites):
    """cut(a, a) is refused: a host cannot be cut from itself."""
    with pytest.raises(SitesError, match="from itself"):
        sites.cut("a", "a")


def test_rate_must_be_positive(sites):
    """rate() refuses zero and negative rates with one line, before tc runs."""
    with pytest.raises(SitesError, match="positive Mbit/s, not 0"):
        sites.rate("r", 0)
