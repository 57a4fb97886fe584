"""wire/etcd.py against a real etcd (Debian's etcd-server) with TLS from a
session PKI, started by harness/etcd.py on loopback: one member for the key
and lease operations, three for endpoint rotation."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time

import pytest

import cgtest
from coordinator import pki
from harness.etcd import EtcdCluster, EtcdRigError, _free_ports
from wire import tls
from wire import etcd as etcd_mod
from wire.etcd import KV, Etcd, EtcdError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture
def need_etcd():
    cgtest.need("etcd", "etcdctl")


def poll(pred, timeout: float, what: str, step: float = 0.05):
    """The first true value of ``pred()`` within ``timeout`` s, else fail."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(step)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    cgtest.need("etcd", "etcdctl")
    base = tmp_path_factory.mktemp("etcd1")
    with EtcdCluster(str(base / "data"), str(base / "pki"), n=1) as c:
        c.wait_healthy(30)
        yield c


@pytest.fixture
def etcd(one, request):
    e = Etcd(one.endpoints(), one.client_dir, timeout=2)
    yield e
    e.delete_prefix(e.key(request.node.name, ""))
    e.close()


# -- pure parts (no etcd) ---------------------------------------------------

def test_key_layout():
    """key(): PREFIX/SESSION/PARTS, the prefix as given (slashes trimmed)."""
    assert Etcd(["http://h:1"]).key("demo", "state", "direction") == \
        "/cgmirror/demo/state/direction"
    assert Etcd(["http://h:1"], prefix="/x/y/").key("s", "leader") == "/x/y/s/leader"


def test_endpoints_from_a_comma_list():
    """A node's ``etcd=URL,URL`` parameter is accepted as it comes."""
    e = Etcd("http://10.0.0.1:2379,http://10.0.0.2:2379")
    assert e.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")


@pytest.mark.parametrize("url, parsed", [
    ("https://10.0.0.1:2379", ("https", "10.0.0.1", 2379)),
    ("https://[fd00::1]:2379/", ("https", "fd00::1", 2379)),
    ("http://etcd.example:1", ("http", "etcd.example", 1)),
])
def test_parse_endpoint_good(url, parsed):
    """Scheme, host (IPv6 unbracketed) and port."""
    assert etcd_mod.parse_endpoint(url) == parsed


@pytest.mark.parametrize("url", ["10.0.0.1:2379", "https://h", "https://h:99999",
                                 "unix:///run/etcd.sock", "https://u:p@h:1",
                                 "https://h:1/v3", "https://h:1?x=1", "https://:2379"])
def test_parse_endpoint_bad(url):
    """Anything but scheme://host:port is refused in one line."""
    with pytest.raises(ValueError, match="not an etcd URL") as e:
        etcd_mod.parse_endpoint(url)
    assert "\n" not in str(e.value)


def test_prefix_range_end():
    """The end of a prefix range: last byte + 1; trailing 0xff bytes dropped."""
    assert etcd_mod._prefix_end(b"/a/") == b"/a0"
    assert etcd_mod._prefix_end(b"a\xff\xff") == b"b"
    assert etcd_mod._prefix_end(b"\xff") == b"\0"


def test_kv_decodes_the_gateway_json():
    """A range answer's item (base64 key and value, revisions as strings)."""
    item = {"key": "L2EvYg==", "value": "eyJuIjogMX0=", "create_revision": "7",
            "mod_revision": "9", "lease": "7587862011011782402", "version": "2"}
    assert etcd_mod._kv(item) == KV("/a/b", b'{"n": 1}', 7, 9, 7587862011011782402)
    assert etcd_mod._kv({"key": "L2E=", "create_revision": "3", "mod_revision": "3"}) \
        == KV("/a", b"", 3, 3, 0)


# -- against a real etcd -----------------------------------------------------


def test_create_once_then_refused_and_revisions_grow(etcd, request):
    """create: a revision the first time, None while the key exists; a later
    create (after delete) gets a higher revision than any before."""
    a, b = etcd.key(request.node.name, "a"), etcd.key(request.node.name, "b")
    r1 = etcd.create(a, b'{"n": 1}')
    assert r1 and r1 > 0
    assert etcd.create(a, b'{"n": 2}') is None
    kv = etcd.get(a)
    assert (kv.value, kv.create_rev, kv.mod_rev, kv.lease) == (b'{"n": 1}', r1, r1, 0)
    r2 = etcd.create(b, "text is utf-8: é")
    assert r2 > r1
    assert etcd.get(b).value == "text is utf-8: é".encode()
    etcd.delete(a)
    assert etcd.get(a) is None
    r3 = etcd.create(a, b"again")
    assert r3 > r2 and etcd.get(a).create_rev == r3


def test_get_prefix_is_only_that_prefix_in_key_order(etcd, request):
    """get_prefix('/p/') returns /p/a, /p/b, not /p0 nor /p."""
    p = etcd.key(request.node.name, "p")
    for k in (p + "/b", p + "/a", p + "0", p):
        etcd.put(k, k)
    assert [kv.key for kv in etcd.get_prefix(p + "/")] == [p + "/a", p + "/b"]
    assert etcd.delete_prefix(p + "/") == 2
    assert etcd.get_prefix(p + "/") == []


def test_lease_expiry_removes_the_key_and_keepalive_keeps_it(etcd, request):
    """Two keys under two 2 s leases: the one not kept alive goes away (polled),
    the one renewed meanwhile is still there, past its TTL."""
    gone, kept = etcd.key(request.node.name, "gone"), etcd.key(request.node.name, "kept")
    l_gone, l_kept = etcd.grant(2), etcd.grant(2)
    assert l_gone != l_kept
    assert etcd.create(gone, b"1", l_gone) and etcd.create(kept, b"1", l_kept)
    assert etcd.get(kept).lease == l_kept and 1 <= etcd.ttl(l_kept) <= 2
    start = time.monotonic()

    def expired():
        assert etcd.keepalive(l_kept) >= 1
        return etcd.get(gone) is None

    poll(expired, 8, "the key of an expired lease to go", step=0.3)
    assert time.monotonic() - start >= 1.0         # not before its TTL
    assert etcd.keepalive(l_gone) == 0
    assert etcd.get(kept) is not None
    etcd.revoke(l_kept)
    assert etcd.get(kept) is None and etcd.keepalive(l_kept) == 0
    etcd.revoke(l_kept)                             # already gone: fine


def test_write_under_a_gone_lease_is_refused_in_one_line(etcd, request):
    """put with a revoked lease: EtcdError naming the endpoint and etcd's reason."""
    lease = etcd.grant(5)
    etcd.revoke(lease)
    with pytest.raises(EtcdError) as e:
        etcd.put(etcd.key(request.node.name, "x"), b"1", lease)
    msg = str(e.value)
    assert "\n" not in msg and "lease not found" in msg and etcd.endpoints[0] in msg


def test_put_if_is_compare_and_swap(etcd, request):
    """put_if(mod_rev): 0 writes only an absent key; a stale mod_rev changes nothing."""
    k = etcd.key(request.node.name, "cas")
    assert etcd.put_if(k, b"v1", 0)
    assert not etcd.put_if(k, b"v1b", 0)
    first = etcd.get(k)
    assert etcd.put_if(k, b"v2", first.mod_rev)
    assert not etcd.put_if(k, b"v3", first.mod_rev)
    now = etcd.get(k)
    assert now.value == b"v2" and now.mod_rev > first.mod_rev
    assert now.create_rev == first.create_rev


def test_put_if_value_writes_only_under_its_guard(etcd, request):
    """put_if_value: written while the guard holds the value; not when it
    holds another or is absent (and the key keeps its value)."""
    k, g = etcd.key(request.node.name, "lease"), etcd.key(request.node.name, "writer")
    assert not etcd.put_if_value(k, b"1", g, b"a")        # guard absent
    assert etcd.get(k) is None
    etcd.put(g, b"a")
    lease = etcd.grant(5)
    assert etcd.put_if_value(k, b"1", g, b"a", lease)
    assert etcd.get(k).lease == lease
    etcd.put(g, b"b")
    assert not etcd.put_if_value(k, b"2", g, b"a", lease)
    assert etcd.get(k).value == b"1"
    etcd.revoke(lease)


def test_a_retried_create_recognises_its_own_key(one, request):
    """After a retry (first endpoint dead), a create that finds the key
    with its own lease and value reports that key's revision; one that
    finds another's key reports None."""
    dead = f"https://127.0.0.1:{_free_ports(1)[0]}"
    e = Etcd([dead, *one.endpoints()], one.client_dir, timeout=2)
    request.addfinalizer(e.close)
    k = e.key(request.node.name, "leader")
    lease = e.grant(5)
    rev = e.create(k, b"me", lease)
    e._current = 0                          # the dead one first again
    assert e.create(k, b"me", lease) == rev
    e._current = 0
    assert e.create(k, b"someone else", lease) is None
    other = e.grant(5)
    e._current = 0
    assert e.create(k, b"me", other) is None
    e.revoke(lease)
    e.revoke(other)


def test_tls_client_of_another_ca_is_refused(one, tmp_path):
    """A client certificate from another CA is refused by etcd; a client that
    trusts another CA refuses etcd's certificate; both in one line."""
    pki.init(str(tmp_path / "other"), "other")
    other = pki.issue(str(tmp_path / "other"), "intruder", ips=["127.0.0.1"])
    mixed = str(tmp_path / "mixed")
    shutil.copytree(other, mixed)
    shutil.copy(os.path.join(one.client_dir, tls.CA_CERT), os.path.join(mixed, tls.CA_CERT))
    with pytest.raises(EtcdError) as e, Etcd(one.endpoints(), mixed, timeout=2) as client:
        client.get("/x")
    assert "refused this client's certificate" in str(e.value), str(e.value)
    with pytest.raises(EtcdError) as e, Etcd(one.endpoints(), other, timeout=2) as client:
        client.get("/x")
    assert "not from this session's CA" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_tls_member_certificate_must_name_the_address_dialled(need_etcd, tmp_path):
    """A member whose certificate names another address (127.0.0.2, dialled
    at 127.0.0.1) is refused by the client, in one line saying so."""
    c = EtcdCluster(str(tmp_path / "data"), str(tmp_path / "pki"), n=1)   # not started
    c[0].cert_dir = pki.issue(c.pki, "misnamed", ips=["127.0.0.2"])
    with c, Etcd(c.endpoints(), c.client_dir, timeout=1) as client:
        def refused():
            try:
                client.get("/x")
            except EtcdError as exc:
                return "does not name the address" in str(exc) and str(exc)
            pytest.fail("a member with a misnamed certificate answered")
        msg = poll(refused, 10, "the misnamed member to listen")
        assert "\n" not in msg and "127.0.0.2" in msg


def test_rig_says_when_a_member_cannot_start(need_etcd, tmp_path):
    """A member whose client port is taken exits; wait_healthy says so at
    once, with its log's last line, instead of waiting out its timeout."""
    c = EtcdCluster(str(tmp_path / "data"), str(tmp_path / "pki"), n=1)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", c[0].client_port))
    taken.listen()
    try:
        with c:
            t = time.monotonic()
            with pytest.raises(EtcdRigError, match="m0 .exited") as e:
                c.wait_healthy(30)
            assert time.monotonic() - t < 10 and "\n" not in str(e.value)
    finally:
        taken.close()


def test_bad_arguments_are_refused_before_any_request(tmp_path):
    """No endpoint, more than 7, a non-URL, https without certificates, a
    certificate directory without its files, a TTL below 1."""
    with pytest.raises(ValueError, match="1 to 7"):
        Etcd([], None)
    with pytest.raises(ValueError, match="1 to 7"):
        Etcd([f"http://h:{i}" for i in range(1, 9)], None)
    with pytest.raises(ValueError, match="not an etcd URL"):
        Etcd(["h:2379"], None)
    with pytest.raises(ValueError, match="certificate directory"):
        Etcd(["https://h:2379"], None)
    with pytest.raises(tls.TLSConfigError, match="is missing"):
        Etcd(["https://h:2379"], str(tmp_path))
    with pytest.raises(ValueError, match="whole seconds"):
        Etcd(["http://h:1"], None).grant(0)


def test_three_members_a_dead_one_is_skipped_all_dead_is_one_line(need_etcd, tmp_path, request):
    """Three members: the member a client used is SIGKILLed, the next call
    is answered by another at once; one SIGSTOPped costs at most the
    timeout; all down: EtcdError naming every endpoint, within n x timeout."""
    with EtcdCluster(str(tmp_path / "data"), str(tmp_path / "pki"), n=3) as c:
        c.wait_healthy(30)
        e = Etcd(c.endpoints(), c.client_dir, timeout=1)
        request.addfinalizer(e.close)
        k = e.key("rotation", "k")
        # The client's member is a follower: its death costs no election,
        # so the next call is answered at once.
        used = (c.leader() + 1) % 3
        e._current = used
        e.put(k, b"1")
        assert e._current == used
        c.kill(used)
        t = time.monotonic()
        assert e.get(k).value == b"1"
        assert time.monotonic() - t < 0.5                  # refused: no timeout spent
        assert e._current != used
        c.start(used)
        c.wait_healthy(30)
        # A silent member (alive, stopped; a follower, so no election adds
        # to it): its request costs the timeout (1 s), the next answers.
        silent = e._current = (c.leader() + 1) % 3
        c.pause(silent)
        try:
            t = time.monotonic()
            assert e.put(k, b"2")
            assert 1 <= time.monotonic() - t < 2 * 1 + 0.5
            assert e._current != silent
        finally:
            c.resume(silent)
        for i in range(3):
            c.kill(i)
        t = time.monotonic()
        with pytest.raises(EtcdError) as err:
            e.get(k)
        took = time.monotonic() - t
        msg = str(err.value)
        assert "\n" not in msg and took < 3 * 1 + 1.0
        for url in c.endpoints():
            assert url in msg
        assert msg.count("connection refused") == 3
        # And back: every member from its data directory, the key kept.
        c.start_all()
        c.wait_healthy(30)
        assert poll(lambda: _try(e.get, k), 10, "a read after restart").value == b"2"


def _try(f, *args):
    try:
        return f(*args)
    except EtcdError:
        return None


def test_members_inside_hosts_on_their_addresses(need_etcd, tmp_path):
    """Namespace placement: member i inside host i on its own address; a
    client inside a host reads and writes; a host cut off from the others is
    unhealthy while the two others go on, and it rejoins after the heal."""
    cgtest.need_netns()
    from harness.sites import Sites
    with Sites(("e1", "e2", "e3"), subnet="10.213.19.0/24") as net, \
            EtcdCluster(str(tmp_path / "data"), str(tmp_path / "pki"), hosts=list(net)) as c:
        assert c.endpoints() == [f"https://{s.addr}:2379" for s in net]
        c.wait_healthy(30)
        code = ("import sys; from wire.etcd import Etcd;"
                " e = Etcd(sys.argv[1].split(','), sys.argv[2], timeout=1);"
                " print(e.put('/k', 'v'), e.get('/k').value.decode())")
        r = net["e2"].run([sys.executable, "-c", code, ",".join(c.endpoints()),
                           c[1].cert_dir], check=False, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.split()[1] == "v", r.stderr
        cut = c.leader()
        others = [i for i in range(3) if i != cut]
        for i in others:
            net.cut(net.names[cut], net.names[i])
        try:
            c.wait_healthy(15, members=others)
            poll(lambda: not c.healthy(cut), 15, "the cut member to lose its quorum")
            assert c.leader() in others
        finally:
            for i in others:
                net.heal(net.names[cut], net.names[i])
        c.wait_healthy(30)
