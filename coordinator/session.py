"""The session file: which slaves, which volumes, which targets.

A session is one TOML file (``-s FILE`` or ``$CGMIRROR_SESSION``)::

    [session]
    name = "demo"
    state_dir = "state"            # history.sqlite, coordinator.lock
    max_coordination_ms = 1000     # freeze -> all frozen budget, else abort all
    lease_ms = 5000                # a frozen slave thaws by itself after this
    copy_timeout_ms = 30000        # a target silent this long fails the copy

    [[slave]]
    name = "s1"
    state_dir = "run/s1"           # the slave's statedir
    nbd_socket = "run/s1.sock"     # where it serves its volumes
    control = "run/s1.ctl"         # its control socket
    threads = 1                    # optional, nbdkit --threads (1 is fastest: the GIL)
    granularity = "64K"            # optional, bytes per change bit

    [[slave.volume]]
    name = "db"
    path = "data/db.img"
    size = "64M"                   # optional: create if missing, else check
    target = "nbd+unix:///db?socket=remote/db.sock"

Two sites (TCP): a slave's ``control`` may be ``tcp:HOST:PORT`` (or
``unix:PATH``, or a plain path as above), and ``nbd = "tcp:HOST:PORT"``
serves its volumes on TCP instead of ``nbd_socket`` (``nbd = "unix:PATH"``
is the same as ``nbd_socket``; give one of the two).  Every TCP path is
mutual TLS from one session PKI (docs/TLS.md)::

    [session]
    pki = "pki"                    # the directory `cgmirror pki init` made
                                   #   (default: state_dir/pki)
    cert = "coordinator"           # the coordinator's certificate (pki/NAME/)

    [[slave]]
    control = "tcp:10.0.0.2:7001"
    nbd = "tcp:10.0.0.2:10809"
    cert = "s1"                    # this slave's certificate (default: its name)

    [[slave.volume]]
    target = "nbds://10.0.0.9:10809/db"

The rule: a target on TCP must be ``nbds://`` (TLS); ``nbd://HOST`` is
refused, as a plaintext TCP copy would let anyone on the path read or write
the volume.  A slave gets its certificate directory (plugin key ``tls=``)
when it uses TCP anywhere (control, NBD, a target); the coordinator uses its
own to reach TCP control channels.

A mirrored session (``cgmirror mirror run``, coordinator/mirror/) names
its secondaries (the remote site: the same plugin with ``role=secondary``)
and the mirror's settings in tables of their own::

    [mirror]
    interval_ms = 0                # pause between groups (0: back to back)
    max_drain_ms = 10000           # a drain longer than this gives its bits back
    rpo_threshold_s = 30           # older hardened group: state "severe"
    control = "run/mirror.ctl"     # optional: the running mirror's control socket
                                   # (default <state_dir>/mirror.ctl)
    metrics = "127.0.0.1:9942"     # optional: Prometheus endpoint (off if absent)
    rate = "50M"                   # optional: drain limit per volume, bytes/s
                                   # (`cgmirror mirror rate` changes it at run time)

    [[secondary]]
    name = "r1"
    state_dir = "remote/r1"
    nbd_socket = "remote/r1.sock"  # host exports NAME, replication repl-TOKEN/NAME
    control = "remote/r1.ctl"
    granularity = "64K"            # optional

    [[secondary.volume]]
    name = "db"
    path = "remote/db.img"
    size = "64M"                   # optional: create if missing, else check

A secondary at the remote site takes the same address keys as a slave:
``control = "tcp:HOST:PORT"``, ``nbd = "tcp:HOST:PORT"`` (instead of
``nbd_socket``) and ``cert`` (default: its name).  It then serves NBD with
mutual TLS from its certificate directory, the coordinator reaches its
control with its own certificate, and the primaries drain to it over
``nbds://`` with theirs (a primary mirroring to a TCP secondary gets its
certificate directory even when all its own paths are unix sockets)::

    [[secondary]]
    name = "r1"
    state_dir = "remote/r1"
    control = "tcp:10.0.0.9:7001"
    nbd = "tcp:10.0.0.9:10809"     # replication: nbds://10.0.0.9:10809/repl-TOKEN/NAME

A primary volume then names its remote instead of a ``target`` (it has
exactly one of the two): ``secondary = "r1"`` and optionally
``remote_volume = "db"`` (default: the volume's own name).  The replication
URI is built at run time from the secondary's address and the export name its
status gives (``replication_uri``).  Two primary volumes may not
share a secondary volume.

Cluster mode (optional; without it everything runs on local files): the
session's leadership, fencing epoch and shared state live in an etcd cluster
(wire/etcd.py), reached over https with the session's own PKI -- the
coordinator with its certificate directory (``[session] cert``), a node with
the one it already gets (``tls=``); the CA is ``ca-cert.pem`` there, the only
trust anchor, so plain ``http://`` is refused::

    [cluster]
    etcd = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
    ttl_s = 5                      # the leader's lease, whole seconds, 2..60
    fence = "none"                 # or "lease": primaries take host writes only
                                   #   while their site holds a lease in etcd
    lease_ttl_s = 5                # the primaries' write lease, whole seconds
                                   #   2..60 (default ttl_s)
    prefix = "/cgmirror"           # optional: keys live under PREFIX/SESSION/

``etcd`` lists 1 to 7 distinct members (etcd's own limit for a sane
cluster); ``coordinator_tls`` (the coordinator's certificate directory for
etcd) is ``pki/<[session] cert>``.

Relative paths, including the ``socket=`` of a ``+unix`` target URI, are
relative to the directory of the TOML file.  No two volumes may have the same
image as their target, however it is spelled (``wire.nbduri``).  Every problem is refused with one
line naming the file, the table and the key; nothing is defaulted silently
except the optional keys above.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass

from coordinator.launch import SlaveSpec
from wire.protocol import MAX_LEASE_MS, MAX_SLAVE_VOLUMES
from wire.units import parse_size
from wire import address as wire_address
from wire import nbduri
from wire.etcd import parse_endpoint

from .errors import ConfigError, UsageError

ENV = "CGMIRROR_SESSION"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET = 107

_SESSION_KEYS = {"name", "state_dir", "max_coordination_ms", "lease_ms", "copy_timeout_ms",
                 "pki", "cert"}
_SLAVE_KEYS = {"name", "state_dir", "nbd_socket", "nbd", "control", "threads",
               "granularity", "volume", "cert"}
_VOLUME_KEYS = {"name", "path", "size", "target", "secondary", "remote_volume"}
_MIRROR_KEYS = {"interval_ms", "max_drain_ms", "rpo_threshold_s", "control", "metrics",
                "rate"}
_SECONDARY_KEYS = {"name", "state_dir", "nbd_socket", "nbd", "control", "granularity",
                   "volume", "cert"}
_SECONDARY_VOLUME_KEYS = {"name", "path", "size"}
_CLUSTER_KEYS = {"etcd", "ttl_s", "fence", "lease_ttl_s", "prefix"}
FENCES = ("none", "lease")
MAX_ETCD_ENDPOINTS = 7
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.-]+)+$")
MIRROR_CONTROL = "mirror.ctl"


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: str
    size: int | None
    target: str | None              # a fixed NBD URI, or None if mirrored
    secondary: str | None = None    # the [[secondary]] that mirrors it
    remote_volume: str | None = None


@dataclass(frozen=True)
class MirrorConfig:
    """The ``[mirror]`` table (defaults if absent)."""

    interval_ms: int
    max_drain_ms: int
    rpo_threshold_s: float
    control: str
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (host, port); off if None
    rate: int | None = None                 # drain limit, bytes/s per volume; None: none


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` table: the session's etcd cluster (None if absent)."""

    etcd: tuple[str, ...]           # https://HOST:PORT of every member
    ttl_s: int = 5                  # the leader's lease, whole seconds
    fence: str = "none"             # "none" or "lease" (FENCES)
    lease_ttl_s: int = 5            # the primaries' write lease, whole seconds
    prefix: str = "/cgmirror"       # keys live under PREFIX/SESSION/
    # The coordinator's certificate directory for etcd (pki/<[session] cert>).
    coordinator_tls: str | None = None


ROLES = ("primary", "secondary")


@dataclass(frozen=True)
class NodeConfig:
    """One node: a ``[[slave]]`` or a ``[[secondary]]``.  Both are the same
    plugin on their own volumes; ``role`` is the one it runs in, in this
    session (``[[slave]]`` primary, ``[[secondary]]`` secondary; an oriented
    session, coordinator/direction.py, swaps them).  A secondary's volumes
    have neither ``target`` nor ``secondary``."""

    name: str
    role: str                       # "primary" or "secondary" (ROLES)
    state_dir: str
    nbd_socket: str
    control: str
    granularity: int | None
    volumes: tuple[VolumeConfig, ...]
    threads: int | None = None      # nbdkit --threads; None: SlaveSpec's default
    # TCP (see the header): nbd is a tcp:HOST:PORT or None (then nbd_socket);
    # tls the node's certificate directory, client_tls the coordinator's
    # (None where no TCP path needs them).
    nbd: str | None = None
    tls: str | None = None
    client_tls: str | None = None
    # The session it belongs to (the file's [session] name): every control
    # request to it carries it, and the node refuses another session's.
    session: str | None = None

    def spec(self) -> SlaveSpec:
        """How to run this node in its role (for coordinator.launch).  A key
        the session file left out (None) keeps SlaveSpec's default, so the
        defaults live in one place."""
        keys = {"threads": self.threads, "granularity": self.granularity}
        spec = SlaveSpec(name=self.name, statedir=self.state_dir, nbd_socket=self.nbd_socket,
                         control=self.control, role=self.role,
                         volumes=[(v.name, v.path, v.size) for v in self.volumes],
                         nbd=self.nbd, tls=self.tls, client_tls=self.client_tls,
                         **{k: v for k, v in keys.items() if v is not None})
        # SlaveLink.from_spec sends it with every request (and launch may
        # pass it to the node as session=).
        spec.session = self.session
        return spec

    def volume(self, name: str) -> VolumeConfig:
        for v in self.volumes:
            if v.name == name:
                return v
        raise KeyError(name)


@dataclass(frozen=True)
class Session:
    path: str
    name: str
    state_dir: str
    max_coordination_ms: int
    lease_ms: int
    copy_timeout_ms: int
    slaves: tuple[NodeConfig, ...]
    mirror: MirrorConfig | None = None
    secondaries: tuple[NodeConfig, ...] = ()
    cluster: ClusterConfig | None = None

    def slave(self, name: str) -> NodeConfig:
        for s in self.slaves:
            if s.name == name:
                return s
        raise UsageError(f"session {self.name} has no slave {name!r}"
                         f" (it has: {', '.join(s.name for s in self.slaves)})")

    def select(self, names: list[str] | None) -> list[NodeConfig]:
        """The named slaves (all if none named), in session order."""
        if not names:
            return list(self.slaves)
        for n in names:
            self.slave(n)
        return [s for s in self.slaves if s.name in names]

    def specs(self) -> list[SlaveSpec]:
        return [s.spec() for s in self.slaves]

    def targets(self) -> dict[str, dict[str, str]]:
        """{slave: {volume: target URI}} for every volume with a fixed target
        (a mirrored volume's URI needs its secondary: ``replication_uri``)."""
        return {s.name: {v.name: v.target for v in s.volumes if v.target}
                for s in self.slaves}

    def secondary(self, name: str) -> NodeConfig:
        for r in self.secondaries:
            if r.name == name:
                return r
        names = ", ".join(r.name for r in self.secondaries) or "none"
        raise UsageError(f"session {self.name} has no secondary {name!r} (it has: {names})")

    def pairs(self) -> list[tuple[str, str, str, str]]:
        """Every mirrored volume: (slave, volume, secondary, remote volume)."""
        return [(s.name, v.name, v.secondary, v.remote_volume)
                for s in self.slaves for v in s.volumes if v.secondary]


_LOCAL = "this host"


def _host_of(control: str) -> str:
    """The host a node runs on, as far as a session file says: the host of
    its control address over TCP, or this host (unix, loopback)."""
    a = wire_address.parse(control)
    if not a.is_tcp:
        return _LOCAL
    try:
        if ipaddress.ip_address(a.host).is_loopback:
            return _LOCAL
    except ValueError:
        if a.host == "localhost":
            return _LOCAL
    return a.host


def replication_uri(secondary: NodeConfig, export: str) -> str:
    """The NBD URI of a secondary's replication export ``export`` (the name
    its status gives, ``repl-TOKEN/NAME``): ``nbds://HOST:PORT/...`` on TCP
    (the primary's copier brings its own certificate), else ``nbd+unix``.
    Spelled the same way every time: the primary's baseline is keyed by
    this string."""
    return secondary.spec().uri(export)


def locate(path: str | None) -> str:
    """The session file to use: ``path``, else ``$CGMIRROR_SESSION``."""
    path = path or os.environ.get(ENV)
    if not path:
        raise UsageError(f"no session file: give -s FILE or set {ENV}")
    return path


def load(path: str) -> Session:
    """Read and validate a session file; raise ConfigError (one line) if bad."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such session file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        # tomllib decodes the whole file first; TOML is UTF-8 by definition.
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at"
                          f" offset {exc.start}); save it as UTF-8") from exc
    return _Parser(path).session(data)


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, where: str, key: str | None, problem: str):
        at = f"{where}, key {key!r}" if key else where
        raise ConfigError(f"{self.path}: {at}: {problem}")

    def keys(self, where: str, table, allowed: set[str], required: tuple[str, ...]):
        if not isinstance(table, dict):
            self.fail(where, None, "must be a table")
        for key in table:
            if key not in allowed:
                self.fail(where, key, f"unknown key (known: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in table:
                self.fail(where, key, "missing")

    def name(self, where, table, key="name") -> str:
        v = table[key]
        if not isinstance(v, str) or not _NAME.match(v):
            self.fail(where, key, f"must be 1-64 letters, digits, '_', '-', '.',"
                                  f" not {v!r}")
        return v

    def address(self, where, table, key) -> str:
        """A tcp:HOST:PORT as written, or a unix socket path made absolute."""
        text = self.string(where, table, key)
        try:
            addr = wire_address.parse(text)
        except wire_address.AddressError as exc:
            self.fail(where, key, str(exc))
        if addr.is_tcp:
            return str(addr)
        return self.path_(where, {key: addr.path}, key, socket=True)

    def mirror_control(self, where, t) -> str:
        """``[mirror] control``: a unix socket only.  Its clients are the
        cgmirror commands of the mirror's own host (peer credentials are its
        authentication); a TCP address would silently become a file named
        ``tcp:...``, so it is refused."""
        addr = self.address(where, t, "control")
        if addr.startswith("tcp:"):
            self.fail(where, "control", f"{addr} is TCP; the mirror's control is a unix"
                                        f" socket on its own host: write a path like"
                                        f" \"/run/cgmirror/mirror.ctl\"")
        return addr

    def nbd_listen(self, where, t) -> tuple[str, str | None]:
        """(nbd_socket, tcp address or None) from ``nbd_socket`` or ``nbd``."""
        if "nbd" not in t and "nbd_socket" not in t:
            self.fail(where, "nbd_socket", "missing (or nbd = \"tcp:HOST:PORT\")")
        if "nbd" in t and "nbd_socket" in t:
            self.fail(where, "nbd", "give nbd or nbd_socket, not both")
        if "nbd_socket" in t:
            return self.path_(where, t, "nbd_socket", socket=True), None
        addr = self.address(where, t, "nbd")
        if addr.startswith("tcp:"):
            return "", addr
        return addr, None

    def tls_dirs(self, where, t, name, control, nbd, volumes) -> tuple[str | None, ...]:
        """The node's (slave's or secondary's) and the coordinator's
        certificate directories, where a TCP path needs them."""
        cert = self.name(where, t, "cert") if "cert" in t else name
        tcp_control = control.startswith("tcp:")
        # A volume mirrored to a secondary on TCP: its drain is an nbds:// copy.
        uses_tcp = tcp_control or nbd is not None or any(
            (v.target or "").startswith("nbds") or v.secondary in self.tcp_secondaries
            for v in volumes)
        slave_dir = os.path.join(self.pki, cert) if uses_tcp else None
        coord_dir = os.path.join(self.pki, self.coordinator_cert) if tcp_control else None
        return slave_dir, coord_dir

    def string(self, where, table, key) -> str:
        v = table[key]
        if not isinstance(v, str) or not v:
            self.fail(where, key, f"must be a non-empty string, not {v!r}")
        return v

    def path_(self, where, table, key, socket: bool = False) -> str:
        p = os.path.normpath(os.path.join(self.base, self.string(where, table, key)))
        if socket and len(p.encode()) > _MAX_SOCKET:
            self.fail(where, key, f"socket path {p} is longer than {_MAX_SOCKET} bytes")
        return p

    def integer(self, where, table, key, default, lo, hi) -> int:
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self.fail(where, key, f"must be an integer from {lo} to {hi}, not {v!r}")
        return v

    def size(self, where, table, key) -> int | None:
        if key not in table:
            return None
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(where, key, f"must be a size like 4096 or \"64M\", not {v!r}")
        try:
            size = parse_size(str(v))
        except ValueError as exc:
            self.fail(where, key, str(exc))
        return size

    def target(self, where, table) -> str:
        uri = self.string(where, table, "target")
        try:
            parsed = nbduri.parse(uri, self.base)
        except ValueError as exc:
            self.fail(where, "target", str(exc))
        if parsed.endpoint.transport == "tcp" and not parsed.tls:
            self.fail(where, "target", f"{uri} is plaintext TCP: write nbds://... (mutual"
                                       f" TLS from the session's pki; plaintext is refused)")
        if parsed.endpoint.transport != "unix":
            return uri
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        # libnbd resolves a relative socket against its own working directory:
        # make it absolute (normpath, not realpath: the user's spelling stays).
        sock = os.path.normpath(os.path.join(self.base, dict(query)["socket"]))
        if len(sock.encode()) > _MAX_SOCKET:
            self.fail(where, "target", f"socket path {sock} is longer than"
                                       f" {_MAX_SOCKET} bytes")
        query = [(k, sock if k == "socket" else v) for k, v in query]
        # Not urlunsplit: it drops the empty authority ("nbd+unix:/db"), which
        # libnbd refuses.
        frag = f"#{parts.fragment}" if parts.fragment else ""
        return (f"{parts.scheme}://{parts.netloc}{parts.path}?"
                f"{urllib.parse.urlencode(query, safe='/:')}{frag}")

    def session(self, data: dict) -> Session:
        for key in data:
            if key not in ("session", "slave", "mirror", "secondary", "cluster"):
                self.fail("top level", key, "unknown table (known: session, slave,"
                                            " mirror, secondary, cluster)")
        if "session" not in data:
            self.fail("top level", "session", "missing the [session] table")
        t = data["session"]
        w = "[session]"
        self.keys(w, t, _SESSION_KEYS, ("name",))
        name = self.name(w, t)
        state_dir = (self.path_(w, t, "state_dir") if "state_dir" in t
                     else os.path.join(self.base, "state"))
        # The slave refuses a lease above protocol.MAX_LEASE_MS (a minute: a
        # guest takes a longer stall for a dead disk); say so here, in the file.
        coord = self.integer(w, t, "max_coordination_ms", 1000, 1, MAX_LEASE_MS - 1)
        lease = self.integer(w, t, "lease_ms", 5000, 1, MAX_LEASE_MS)
        copy_timeout = self.integer(w, t, "copy_timeout_ms", 30000, 1000, 3_600_000)
        if lease <= coord:
            self.fail(w, "lease_ms", f"must be larger than max_coordination_ms ({coord}),"
                                     f" else slaves thaw by themselves before the thaw")
        slaves = data.get("slave")
        if not isinstance(slaves, list) or not slaves:
            self.fail("top level", "slave", "needs at least one [[slave]] table")
        self.pki = (self.path_(w, t, "pki") if "pki" in t
                    else os.path.join(state_dir, "pki"))
        self.coordinator_cert = self.name(w, t, "cert") if "cert" in t else "coordinator"
        # The primaries need their certificate to drain to these (checked
        # properly later, in mirror_tables).
        raw = data.get("secondary")
        self.tcp_secondaries = {r.get("name") for r in raw if isinstance(r, dict)
                                and str(r.get("nbd", "")).startswith("tcp:")
                                } if isinstance(raw, list) else set()
        parsed = tuple(self.slave(i, s) for i, s in enumerate(slaves, 1))
        mirror, secondaries = self.mirror_tables(data, state_dir, parsed)
        self.unique(parsed, secondaries)
        parsed = tuple(dataclasses.replace(s, session=name) for s in parsed)
        secondaries = tuple(dataclasses.replace(r, session=name) for r in secondaries)
        cluster = self.cluster(data["cluster"]) if "cluster" in data else None
        return Session(path=os.path.abspath(self.path), name=name, state_dir=state_dir,
                       max_coordination_ms=coord, lease_ms=lease,
                       copy_timeout_ms=copy_timeout, slaves=parsed, mirror=mirror,
                       secondaries=secondaries, cluster=cluster)

    def cluster(self, t) -> ClusterConfig:
        """``[cluster]``: the etcd members (https only, 1..7, distinct), the
        leader's TTL, the fence and the primaries' lease TTL, the prefix."""
        w = "[cluster]"
        self.keys(w, t, _CLUSTER_KEYS, ("etcd",))
        urls = t["etcd"]
        if not isinstance(urls, list) or not 1 <= len(urls) <= MAX_ETCD_ENDPOINTS:
            self.fail(w, "etcd", f"must be a list of 1 to {MAX_ETCD_ENDPOINTS} URLs like"
                                 f" [\"https://10.0.0.1:2379\"], not {t['etcd']!r}")
        seen: dict[tuple[str, int], str] = {}
        endpoints = []
        for url in urls:
            if not isinstance(url, str):
                self.fail(w, "etcd", f"{url!r} is not a URL like \"https://10.0.0.1:2379\"")
            try:
                scheme, host, port = parse_endpoint(url)
            except ValueError as exc:
                self.fail(w, "etcd", str(exc))
            if scheme != "https":
                self.fail(w, "etcd", f"{url} is plaintext http: write https://... (etcd"
                                     f" with TLS from the session's pki, whose CA is the"
                                     f" only trust anchor)")
            other = seen.setdefault((host.lower(), port), url)
            if other != url or url in endpoints:
                self.fail(w, "etcd", f"{url} is listed twice (also as {other})")
            endpoints.append(url.rstrip("/"))
        ttl = self.integer(w, t, "ttl_s", 5, 2, 60)
        fence = t.get("fence", "none")
        if fence not in FENCES:
            self.fail(w, "fence", f"must be \"none\" or \"lease\" (primaries write only"
                                  f" under their site's lease), not {fence!r}")
        lease_ttl = self.integer(w, t, "lease_ttl_s", ttl, 2, 60)
        prefix = t.get("prefix", "/cgmirror")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix) \
                or len(prefix) > 128:
            self.fail(w, "prefix", f"must be a key prefix like \"/cgmirror\" (\"/\" then"
                                   f" letters, digits, '_', '.', '-', parts joined by"
                                   f" '/', at most 128), not {prefix!r}")
        return ClusterConfig(etcd=tuple(endpoints), ttl_s=ttl, fence=fence,
                             lease_ttl_s=lease_ttl, prefix=prefix,
                             coordinator_tls=os.path.join(self.pki, self.coordinator_cert))

    def node(self, kind: str, i: int, t,
             allowed: set[str]) -> tuple[str, str, int | None, list]:
        """What a [[slave]] and a [[secondary]] share: the name for messages,
        the known keys, the node's name, its granularity and its volume
        tables (at least one)."""
        w = f"[[{kind}]] #{i}"
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            w = f"[[{kind}]] {t['name']!r}"
        self.keys(w, t, allowed, ("name", "state_dir", "control", "volume"))
        name = self.name(w, t)
        gran = self.size(w, t, "granularity")
        if gran is not None and (gran & (gran - 1) or gran < 4096):
            self.fail(w, "granularity", f"must be a power of two of at least 4096,"
                                        f" not {t['granularity']!r}")
        vols = t["volume"]
        if not isinstance(vols, list) or not vols:
            self.fail(w, "volume", f"needs at least one [[{kind}.volume]] table")
        if len(vols) > MAX_SLAVE_VOLUMES:
            self.fail(w, "volume", f"{len(vols)} volumes: one {kind} serves at most"
                                   f" {MAX_SLAVE_VOLUMES}; split them over more")
        return w, name, gran, vols

    def slave(self, i: int, t) -> NodeConfig:
        w, name, gran, vols = self.node("slave", i, t, _SLAVE_KEYS)
        threads = self.integer(w, t, "threads", None, 1, 64)
        volumes = tuple(self.volume(name, j, v) for j, v in enumerate(vols, 1))
        seen = set()
        for v in volumes:
            if v.name in seen:
                self.fail(f"[[slave.volume]] {name}/{v.name}", "name",
                          f"slave {name} has two volumes named {v.name!r}")
            seen.add(v.name)
        nbd_socket, nbd = self.nbd_listen(w, t)
        control = self.address(w, t, "control")
        slave_tls, client_tls = self.tls_dirs(w, t, name, control, nbd, volumes)
        return NodeConfig(name=name, role="primary", state_dir=self.path_(w, t, "state_dir"),
                          nbd_socket=nbd_socket, control=control,
                          threads=threads, granularity=gran, volumes=volumes,
                          nbd=nbd, tls=slave_tls, client_tls=client_tls)

    def volume(self, slave: str, j: int, t) -> VolumeConfig:
        w = f"[[slave.volume]] {slave}/#{j}"
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            w = f"[[slave.volume]] {slave}/{t['name']}"
        self.keys(w, t, _VOLUME_KEYS, ("name", "path"))
        name = self.name(w, t)
        if "target" not in t and "secondary" not in t:
            self.fail(w, "target", "missing (or name the volume's 'secondary')")
        if "target" in t and "secondary" in t:
            self.fail(w, "target", "give only one of 'target' (an NBD URI) and"
                                   " 'secondary' (the name of a [[secondary]])")
        if "remote_volume" in t and "secondary" not in t:
            self.fail(w, "remote_volume", "only with 'secondary'")
        if "secondary" in t:
            remote = t.get("remote_volume", name)
            if not isinstance(remote, str) or not _NAME.match(remote):
                self.fail(w, "remote_volume", f"must be a volume name, not {remote!r}")
            return VolumeConfig(name=name, path=self.path_(w, t, "path"),
                                size=self.size(w, t, "size"), target=None,
                                secondary=self.string(w, t, "secondary"),
                                remote_volume=remote)
        return VolumeConfig(name=name, path=self.path_(w, t, "path"),
                            size=self.size(w, t, "size"), target=self.target(w, t))

    def mirror_tables(self, data: dict, state_dir: str, slaves: tuple[NodeConfig, ...]
                      ) -> tuple[MirrorConfig | None, tuple[NodeConfig, ...]]:
        """``[mirror]`` and ``[[secondary]]``; every ``secondary =`` of a
        volume must name one, and each secondary volume mirrors one volume."""
        mirror = None
        if "mirror" in data:
            t, w = data["mirror"], "[mirror]"
            self.keys(w, t, _MIRROR_KEYS, ())
            control = (self.mirror_control(w, t) if "control" in t
                       else os.path.join(state_dir, MIRROR_CONTROL))
            if len(control.encode()) > _MAX_SOCKET:
                self.fail(w, "control", f"socket path {control} is longer than"
                                        f" {_MAX_SOCKET} bytes; set a shorter one")
            rpo = t.get("rpo_threshold_s", 30)
            if isinstance(rpo, bool) or not isinstance(rpo, (int, float)) \
                    or not 0 < rpo <= 86400:
                self.fail(w, "rpo_threshold_s", f"must be a number of seconds above 0"
                                                f" and at most 86400, not {rpo!r}")
            mirror = MirrorConfig(
                interval_ms=self.integer(w, t, "interval_ms", 0, 0, 3_600_000),
                max_drain_ms=self.integer(w, t, "max_drain_ms", 10_000, 10, 3_600_000),
                rpo_threshold_s=float(rpo), control=control,
                metrics=self.metrics_address(w, t), rate=self.rate(w, t))
        raw = data.get("secondary", [])
        if not isinstance(raw, list):
            self.fail("top level", "secondary", "must be [[secondary]] tables")
        secondaries = tuple(self.secondary_table(i, t) for i, t in enumerate(raw, 1))
        by_name: dict[str, NodeConfig] = {}
        for r in secondaries:
            if by_name.setdefault(r.name, r) is not r:
                self.fail(f"[[secondary]] {r.name!r}", "name", "two secondaries have"
                                                               " this name")
        used: dict[tuple[str, str], str] = {}
        for s in slaves:
            for v in s.volumes:
                if not v.secondary:
                    continue
                w = f"[[slave.volume]] {s.name}/{v.name}"
                r = by_name.get(v.secondary)
                if r is None:
                    self.fail(w, "secondary", f"no [[secondary]] is named"
                                              f" {v.secondary!r}")
                if v.remote_volume not in (rv.name for rv in r.volumes):
                    self.fail(w, "remote_volume", f"secondary {r.name} has no volume"
                                                  f" {v.remote_volume!r}")
                other = used.setdefault((r.name, v.remote_volume), f"{s.name}/{v.name}")
                if other != f"{s.name}/{v.name}":
                    self.fail(w, "secondary", f"{r.name}/{v.remote_volume} already mirrors"
                                              f" {other}: give every volume its own")
        if any(v.secondary for s in slaves for v in s.volumes) and mirror is None:
            mirror = MirrorConfig(0, 10_000, 30.0, os.path.join(state_dir, MIRROR_CONTROL))
        return mirror, secondaries

    def metrics_address(self, where, t) -> tuple[str, int] | None:
        """``metrics = "HOST:PORT"``: where the mirror serves Prometheus."""
        if "metrics" not in t:
            return None
        text = self.string(where, t, "metrics")
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            self.fail(where, "metrics", f"must be \"HOST:PORT\" like"
                                        f" \"127.0.0.1:9942\", not {text!r}")
        return host.strip("[]"), int(port)

    def rate(self, where, t) -> int | None:
        """``rate = "50M"``: the drain's limit in bytes per second per volume."""
        rate = self.size(where, t, "rate")
        if rate is not None and rate < 4096:
            self.fail(where, "rate", f"must be at least 4K (bytes per second), not"
                                     f" {t['rate']!r}")
        return rate

    def secondary_table(self, i: int, t) -> NodeConfig:
        w, name, gran, vols = self.node("secondary", i, t, _SECONDARY_KEYS)
        volumes, seen = [], set()
        for j, v in enumerate(vols, 1):
            vw = f"[[secondary.volume]] {name}/#{j}"
            self.keys(vw, v, _SECONDARY_VOLUME_KEYS, ("name", "path"))
            vname = self.name(vw, v)
            if vname in seen:
                self.fail(vw, "name", f"secondary {name} has two volumes named {vname!r}")
            seen.add(vname)
            volumes.append(VolumeConfig(name=vname, path=self.path_(vw, v, "path"),
                                        size=self.size(vw, v, "size"), target=None))
        nbd_socket, nbd = self.nbd_listen(w, t)
        control = self.address(w, t, "control")
        tls, client_tls = self.tls_dirs(w, t, name, control, nbd, ())
        return NodeConfig(name=name, role="secondary",
                          state_dir=self.path_(w, t, "state_dir"),
                          nbd_socket=nbd_socket, control=control,
                          granularity=gran, volumes=tuple(volumes),
                          nbd=nbd, tls=tls, client_tls=client_tls)

    def unique(self, slaves: tuple[NodeConfig, ...],
               secondaries: tuple[NodeConfig, ...] = ()) -> None:
        """Two slaves may not share a name; no two nodes (slaves and
        secondaries alike) may share a socket, a state dir or a volume file
        on one host.  A node's host is the one its control address names
        (unix or loopback: this one), so that nodes on two hosts may use
        the same paths, as the README's two-host walkthrough does."""
        owner: dict[tuple[str, str, str], str] = {}

        def claim(kind: str, value: str, who: str, where: str, key: str,
                  host: str = "") -> None:
            other = owner.setdefault((kind, host, value), who)
            if other != who:
                self.fail(where, key, f"{value} is also used by {other}")

        for s in slaves:
            w, host = f"[[slave]] {s.name!r}", _host_of(s.control)
            claim("name", s.name, f"slave #{slaves.index(s) + 1}", w, "name")
            claim("dir", s.state_dir, f"slave {s.name}", w, "state_dir", host)
            claim("socket", s.nbd or s.nbd_socket, f"slave {s.name} nbd",
                  w, "nbd" if s.nbd else "nbd_socket", "" if s.nbd else host)
            claim("socket", s.control, f"slave {s.name} control", w, "control",
                  host if host == _LOCAL else "")
            for v in s.volumes:
                claim("path", v.path, f"volume {s.name}/{v.name}",
                      f"[[slave.volume]] {s.name}/{v.name}", "path", host)
        for r in secondaries:
            w, host = f"[[secondary]] {r.name!r}", _host_of(r.control)
            claim("dir", r.state_dir, f"secondary {r.name}", w, "state_dir", host)
            claim("socket", r.nbd or r.nbd_socket, f"secondary {r.name} nbd",
                  w, "nbd" if r.nbd else "nbd_socket", "" if r.nbd else host)
            claim("socket", r.control, f"secondary {r.name} control", w, "control",
                  host if host == _LOCAL else "")
            for v in r.volumes:
                claim("path", v.path, f"volume {r.name}/{v.name}",
                      f"[[secondary.volume]] {r.name}/{v.name}", "path", host)
        self.distinct_images(slaves)

    def distinct_images(self, slaves: tuple[NodeConfig, ...]) -> None:
        """No two volumes may copy to one image, and no volume to a source
        export: each copy would overwrite the other and both report done.
        Images are compared by canonical identity (wire.nbduri), so two
        spellings of one socket and export are one image."""
        images: dict[tuple, str] = {}
        for s in slaves:
            sock = nbduri.parse_address(s.nbd or f"unix:{s.nbd_socket}")
            for v in s.volumes:
                images[(sock, v.name)] = f"the source export of {s.name}/{v.name}"
        for s in slaves:
            for v in s.volumes:
                if v.target is None:        # mirrored: checked in mirror_tables
                    continue
                image = nbduri.parse(v.target)
                other = images.setdefault(image.identity, f"the target of {s.name}/{v.name}")
                if other != f"the target of {s.name}/{v.name}":
                    self.fail(f"[[slave.volume]] {s.name}/{v.name}", "target",
                              f"{image.describe()} is also {other}: each copy would"
                              f" overwrite the other; give every volume its own target")
