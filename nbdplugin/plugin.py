# cgmirror slave: serves volumes as NBD exports with change recording and a freeze gate.
#
#   nbdkit -U /run/s1.sock --threads 4 python nbdplugin/plugin.py \
#       statedir=/var/lib/cgmirror/s1 control=/run/s1.ctl \
#       volume=db:/dev/sdb volume=log:/srv/log.img create=log:1G
#
# Keys: statedir= (required; change maps, preserve stores), control= (required;
# the control channel: a unix socket PATH or unix:PATH, only its owner's uid and
# root may connect; or tcp:HOST:PORT, mutual TLS 1.3 with tls='s certificate),
# tls=DIR (this host's certificate directory, made by `cgmirror pki issue`: the
# control server's certificate on TCP and the copier's client certificate for
# nbds:// targets), volume=NAME:PATH (repeat; a regular file
# or a block device; export NAME), create=NAME:SIZE (create NAME's file at SIZE
# if missing, else check its size), granularity= (bytes per change bit, power
# of two, default 64K), region= (bytes per write-intent bit, default 4M),
# checkpoint= (seconds between change-map checkpoints, default 2), role=primary
# (default) or role=secondary (nbdplugin/secondary.py: each volume is served as
# a read-only host export NAME showing the last hardened group, and as the
# replication export repl-TOKEN/NAME, whose name the control channel's status
# op tells; the primary-only keys create= etc. still apply).  A primary whose state directory
# records a DR test (nbdplugin/secondary.py, "DR test") saves the hardened
# group's content of each block before the test first writes it.
#
# Node (issue 18; nbdplugin/noderecord.py): session=NAME node=NAME name the
# session and the node; the node records them, its role and its volumes'
# identity and lineage in STATEDIR/node.json at its first start and refuses
# later starts as another node, for another session, or with other volumes.
# role= is the FIRST role only: once recorded, the recorded role wins (one
# log line if role= says otherwise).  The control op `role` records a new
# role, answers, and ends nbdkit with exit status 75 (wire.protocol.
# RESTART_STATUS) through its clean shutdown: its supervisor (systemd's
# RestartForceExitStatus=, `cgmirror node run`) starts it again, in the
# recorded role.  A request naming another session is refused.
#
# Write lease (issue 19; nbdplugin/writelease.py): fence=lease (default
# fence=none) makes a primary take host writes only while its site holds a
# lease in etcd: etcd=URL,URL,... (https only; the client certificate is
# tls='s), site=a|b (a: the session file's [[slave]] nodes, b: its
# [[secondary]] nodes), lease_ttl=S (whole seconds, 2..60, default 5),
# etcd_prefix=/PATH (default /cgmirror); session= and node= name the key.
# Without the lease (etcd cut off past lease_ttl, or the other site is the
# writer) every host write fails at once with EIO; reads are served.  A
# DR-test primary keeps no lease: its writes are thrown away at its end.
#
# The slave holds an exclusive lock on its state directory and on each volume
# while it runs (a second slave on either is refused, naming the holder), and
# keeps its state private: the directory 0700, its files 0600.  A
# configuration error is one `cgmirror: error:` line on stderr and exit 1.
import errno
import faulthandler
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time

import nbdkit

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# nbdkit does not put the plugin's directory on sys.path, and embeds Debian's
# /usr/bin/python3: add the project and its venv (if any) explicitly.
_VENV_SITE = os.path.join(_ROOT, ".venv", "lib",
                          f"python{sys.version_info[0]}.{sys.version_info[1]}",
                          "site-packages")
for _p in (_VENV_SITE, _ROOT):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.insert(0, _p)

from nbdplugin import copier, threadstate  # noqa: E402
from nbdplugin.changemap import ChangeMapError  # noqa: E402
from nbdplugin.noderecord import NodeRecord, NodeRecordError, identity_of  # noqa: E402
from nbdplugin.blockstore import BlockStore  # noqa: E402
from nbdplugin.secondary import (Secondary, SecondaryVolume, fold_maps,  # noqa: E402
                                 forget_replaced, prepared_group, dr_test_group,
                                 undo_path)
from nbdplugin.server import ControlServerError  # noqa: E402
from nbdplugin.slave import Fence, Slave, StateError  # noqa: E402
from nbdplugin.volume import Volume, VolumeError  # noqa: E402
from nbdplugin.writelease import WriteLease  # noqa: E402
from wire import address as wire_address, files, protocol, sdnotify, tls  # noqa: E402
from wire.units import parse_size  # noqa: E402

API_VERSION = 2

_cfg = {"statedir": None, "control": None, "tls": None, "granularity": 64 * 1024,
        "region": 4 << 20, "checkpoint": 2.0, "role": None, "session": None,
        "node": None, "fence": "none", "etcd": None, "site": None, "lease_ttl": None,
        "etcd_prefix": None}
_lease: WriteLease | None = None   # fence=lease, primary role: the keeper
_volumes: dict[str, str] = {}
_create: dict[str, int] = {}
_slave: Slave | Secondary | None = None
_statedir_fd: int | None = None    # holds the state directory's lock until exit
_exit_status: int | None = None    # RESTART_STATUS once a role change is recorded
# After a role change nbdkit's clean shutdown normally ends in ``cleanup``
# within milliseconds; if a client or a thread holds it up this long, the
# process ends anyway (the maps were checkpointed before the record, and
# the write-intent map covers anything since).
RESTART_GRACE_S = 30.0

# `kill -USR1 PID` dumps every Python thread's stack to the log.
faulthandler.register(signal.SIGUSR1, all_threads=True)
logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                    format="cgmirror[%(process)d] %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("nbdplugin.plugin")


class ConfigError(Exception):
    """The slave's configuration cannot be used (the operator's fault)."""


def _fail(msg):
    raise ConfigError(msg)


def _one_line_errors(fn):
    """Run a configuration callback; on a configuration error print one
    line and exit 1.

    nbdkit 1.32's python plugin turns any exception a callback raises into
    ``nbdkit_error`` of the whole ``traceback.format_exception`` text
    (plugins/python/errors.c, check_python_failure): there is no exception
    it prints as one line.  So a configuration error is printed here and
    the process ends with ``os._exit(1)``: before nbdkit serves there is
    nothing to clean up (no socket, no pidfile yet), and the kernel drops
    our locks.  SystemExit would not do: it is an exception like any other
    to the embedding C code.  A bug (any other exception) keeps its
    traceback.
    """
    def wrapper(*args):
        try:
            return fn(*args)
        except (ConfigError, VolumeError, ChangeMapError, files.LockedError, StateError,
                NodeRecordError, OSError) as exc:
            print(f"cgmirror: error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _split(key, value):
    name, sep, rest = value.partition(":")
    if not sep or not protocol.VOLUME_NAME.fullmatch(name) or not rest:
        _fail(f"{key}={value!r}: expected {key}=NAME:{'PATH' if key == 'volume' else 'SIZE'}"
              f" with NAME made of letters, digits, '_', '-', '.'")
    return name, rest


@_one_line_errors
def config(key, value):
    try:
        _config(key, value)
    except ValueError as exc:
        _fail(f"{key}={value!r}: {exc}")


def _config(key, value):
    if key == "statedir":
        _cfg[key] = os.path.abspath(value)
    elif key == "control":
        # unix:PATH, a plain path or tcp:HOST:PORT; a bad one is refused now.
        addr = wire_address.parse(value, listen=True)
        _cfg[key] = str(addr) if addr.is_tcp else os.path.abspath(addr.path)
    elif key == "tls":
        _cfg[key] = os.path.abspath(value)
    elif key == "volume":
        name, path = _split(key, value)
        if name in _volumes:
            _fail(f"volume {name!r} is given twice")
        _volumes[name] = os.path.abspath(path)
    elif key == "create":
        name, size = _split(key, value)
        _create[name] = parse_size(size)
    elif key in ("granularity", "region"):
        v = parse_size(value)
        if v & (v - 1) or v < 4096:
            _fail(f"{key} must be a power of two of at least 4096, not {value!r}")
        _cfg[key] = v
    elif key == "role":
        if value not in ("primary", "secondary"):
            _fail("role must be primary or secondary")
        _cfg[key] = value
    elif key in ("session", "node"):
        if not protocol.VOLUME_NAME.fullmatch(value):
            _fail(f"{key} must be 1-{protocol.MAX_NAME} letters, digits, '_', '-', '.'")
        _cfg[key] = value
    elif key == "fence":
        if value not in ("none", "lease"):
            _fail("fence must be none or lease")
        _cfg[key] = value
    elif key == "etcd":
        urls = tuple(u.strip() for u in value.split(",") if u.strip())
        if not 1 <= len(urls) <= 7:
            _fail("etcd must list 1 to 7 endpoints, comma-separated")
        for u in urls:
            if not u.startswith("https://"):
                _fail(f"etcd endpoint {u!r} is not https:// (the session's CA is the only"
                      f" trust anchor: plaintext is refused)")
        _cfg[key] = urls
    elif key == "site":
        if value not in ("a", "b"):
            _fail("site must be a or b")
        _cfg[key] = value
    elif key == "lease_ttl":
        v = int(value)
        if not 2 <= v <= 60:
            _fail("lease_ttl must be 2 to 60 whole seconds")
        _cfg[key] = v
    elif key == "etcd_prefix":
        if not value.startswith("/") or value.endswith("/") or "//" in value:
            _fail("etcd_prefix must look like /cgmirror (a leading /, no trailing /)")
        _cfg[key] = value
    elif key == "checkpoint":
        v = float(value)
        if not 0.05 <= v <= 3600:
            _fail("checkpoint must be between 0.05 and 3600 seconds")
        _cfg[key] = v
    else:
        _fail(f"unknown parameter: {key!r}")


@_one_line_errors
def config_complete():
    for key in ("statedir", "control"):
        if not _cfg[key]:
            _fail(f"missing parameter: {key}=")
    if not _volumes:
        _fail("no volume=NAME:PATH given")
    if len(_volumes) > protocol.MAX_SLAVE_VOLUMES:
        _fail(f"{len(_volumes)} volumes: a slave serves at most"
              f" {protocol.MAX_SLAVE_VOLUMES}; run another slave for the rest")
    for name in _create:
        if name not in _volumes:
            _fail(f"create={name}:... names no volume")
    if _cfg["region"] < _cfg["granularity"]:
        _fail("region must not be smaller than granularity")
    if _cfg["fence"] == "lease":
        for key in ("etcd", "site", "session", "node", "tls"):
            if not _cfg[key]:
                _fail(f"fence=lease needs {key}= (the write lease is a key in etcd named"
                      f" by session, site and node, reached with tls='s certificate)")
    else:
        given = [k for k in ("etcd", "site", "lease_ttl", "etcd_prefix") if _cfg[k]]
        if given:
            _fail(f"{'= '.join(given)}= only apply with fence=lease")
    if _cfg["tls"]:
        # Checked now, so a missing or unsafe file is one line before serving.
        try:
            _server_context()
        except tls.TLSConfigError as exc:
            _fail(f"tls={_cfg['tls']}: {exc}")
        copier.TLS_DIR = _cfg["tls"]
    elif _cfg["control"].startswith("tcp:"):
        _fail(f"control={_cfg['control']} needs mutual TLS (plaintext TCP is refused):"
              f" give tls=DIR, a certificate directory from cgmirror pki issue")


def _server_context():
    """The control server's TLS context (None for a unix control socket)."""
    if not _cfg["control"].startswith("tcp:"):
        return None
    return tls.HostFiles(_cfg["tls"]).server_context()


def thread_model():
    # Requests may run in parallel (nbdkit --threads; 1 is fastest, see
    # launch.SlaveSpec); each volume's ChangeMap.lock guards its bitmaps and
    # its Gate's lock guards the gate.  Blocking I/O releases the GIL.
    return nbdkit.THREAD_MODEL_PARALLEL


@_one_line_errors
def get_ready():
    global _slave, _statedir_fd, _fence
    statedir = _cfg["statedir"]
    try:
        files.private_dir(statedir)
        _statedir_fd = os.open(statedir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        _fail(f"state directory {statedir}: {exc.strerror}")
    # The state directory's lock comes first: until we hold it, another
    # slave may own the change maps, and opening them would overwrite them.
    files.lock_exclusive(_statedir_fd, f"state directory {statedir}")
    # The node record says whose this directory is and in which role the
    # node starts; nothing is opened for another node or other volumes.
    node = NodeRecord.load(statedir)
    role = _cfg["role"] or "primary"
    if node is not None:
        node.check_belongs(_cfg["session"], _cfg["node"])
        node.check_volumes(list(_volumes))
        role = node.role
    secondary = role == "secondary"
    prepared = None if secondary else prepared_group(statedir)
    if prepared is not None:
        _fail(f"{statedir} holds group {prepared} prepared as a secondary: start it as a"
              f" secondary and let `cgmirror failover` commit or roll it back first")
    # A secondary promoted for a DR test keeps its hardened group
    # (nbdplugin/secondary.py, "DR test").
    kept = None if secondary else dr_test_group(statedir)
    vols = {}
    for name, path in _volumes.items():
        if secondary:
            vol = SecondaryVolume(name, path, statedir, _cfg["granularity"],
                                  _cfg["region"], _create.get(name))
            _forget_if_replaced(node, vol)
            # A demoted primary: its own unsent writes are target indicators.
            fold_maps(vol, "tgt", ("cr", "oos"))
        else:
            # Both roles keep ``tgt``: the same state directory serves either
            # role (coordinator/roles/failover.py); a promoted secondary's tgt is
            # sent with its next group.
            vol = Volume(name, path, statedir, _cfg["granularity"], _cfg["region"],
                         _create.get(name), extra_maps=("tgt",))
            _forget_if_replaced(node, vol)
            fold_maps(vol, "cr", ("tgt",))
            if kept is not None:
                vol.keep = BlockStore.reopen(undo_path(statedir, name, kept), vol.fd,
                                             vol.granularity, vol.size)
        vols[name] = vol
    if kept is not None:
        logging.getLogger("nbdplugin.plugin").info(
            "DR test: group %d is kept (%s blocks already): every first write saves"
            " it", kept, {n: len(v.keep) for n, v in vols.items()})
    if secondary:
        try:
            _slave = Secondary(vols, statedir)
        except ValueError as exc:       # a damaged token file
            _fail(str(exc))
    else:
        _slave = Slave(vols, statedir, _cfg["checkpoint"])
        _fence = _slave.fence
        if _cfg["fence"] == "lease" and kept is None:
            _start_lease_mode(vols)
    # Recorded once everything else was accepted: a refused start leaves
    # no record behind (and says nothing but its error line).
    identities = {name: identity_of(v.fd, v.size) for name, v in vols.items()}
    if node is None:
        node = NodeRecord.create(statedir, _cfg["session"], _cfg["node"], role, identities)
    else:
        if _cfg["role"] and _cfg["role"] != node.role:
            log.info("%s starts as a %s, its recorded role (role change %d); role=%s is"
                     " only the first role", node.who(), node.role, node.role_seq,
                     _cfg["role"])
        node.start(_cfg["session"], _cfg["node"], _volumes, identities)
    _slave.attach(node)
    _slave.on_restart = _restart


def _start_lease_mode(vols):
    """fence=lease: the keeper, its gates' deadlines in the past until its
    first round (so no write is taken before the lease); its thread starts
    in after_fork.  Status reports ``write_lease``."""
    global _lease
    from wire.etcd import Etcd
    # Rounds every ttl/3: an endpoint that does not answer must not take
    # a whole round, so the client's timeout is a fraction of it.
    ttl = _cfg["lease_ttl"] or 5
    try:
        etcd = Etcd(_cfg["etcd"], tls_dir=_cfg["tls"], timeout=max(0.5, ttl / 6),
                    **({"prefix": _cfg["etcd_prefix"]} if _cfg["etcd_prefix"] else {}))
    except (ValueError, tls.TLSConfigError) as exc:
        _fail(f"fence=lease: the etcd client: {exc}")
    _lease = WriteLease(etcd, _cfg["session"], _cfg["site"], _cfg["node"], ttl,
                        [v.gate for v in vols.values()])
    _slave.write_lease = _lease             # status: OpHandler.node_status


def _forget_if_replaced(node: NodeRecord | None, vol: Volume) -> None:
    """Before anything of the old file is used (undo store, kept blocks,
    maps) and before ``node.start`` records the new identity: a replaced
    volume forgets them (secondary.forget_replaced)."""
    ident = identity_of(vol.fd, vol.size)
    if node is not None and node.replaced_by({vol.name: ident}):
        kind = "device" if ident["kind"] == "block" else "file"
        forget_replaced(vol, f"{vol.path} is not the {kind} {node.who()} served")


@_one_line_errors
def after_fork():
    # Threads must start after nbdkit daemonizes, never in get_ready.  A
    # control server that cannot start ends the slave in one line (its NBD
    # socket and pidfile stay behind; the launcher removes stale ones).
    try:
        files = tls.HostFiles(_cfg["tls"]) if _cfg["tls"] else None
        if isinstance(_slave, Slave):
            _slave.start(_cfg["control"], _server_context(), tls_files=files)
        else:
            _slave.start(_cfg["control"], _server_context())
    except ControlServerError as exc:
        _fail(str(exc))
    if _lease is not None:
        _lease.start()
    # Under systemd (Type=notify): started once the control channel serves;
    # the NBD socket is already listening (nbdkit binds it before forking).
    sdnotify.notify("READY=1")


def _restart():
    """A role change is recorded and its reply written: end nbdkit through
    its clean shutdown (connections closed, then ``cleanup``, which exits
    with RESTART_STATUS; nbdkit.shutdown() alone would exit 0).

    nbdkit 1.32 ends only once every NBD client has hung up, and a host's
    client (qemu, nbd-client) never does by itself: measured, an idle
    client held the exit until the grace timer (30 s).  So the node hangs
    up on its NBD clients (``_hang_up_nbd_clients``), as nbdkit's quit
    would in a later version; they see the connection end as after any
    restart, and reconnect.  Nothing is lost by it: a primary's fence is
    up and a secondary's replication writes are refused since the role op
    (no write is in flight), and every write acknowledged before is in
    the file and in the change maps.  Measured with two idle clients: the
    exit follows the reply within milliseconds."""
    global _exit_status
    _exit_status = protocol.RESTART_STATUS
    nbdkit.shutdown()

    def sweep():
        deadline = time.monotonic() + RESTART_GRACE_S
        # Again and again: a client may have connected before nbdkit's
        # accept loop saw the shutdown.
        while time.monotonic() < deadline:
            try:
                _hang_up_nbd_clients()
            except Exception:
                log.exception("could not hang up on the NBD clients")
            time.sleep(0.2)
        log.error("nbdkit did not shut down within %g s of a role change: exiting"
                  " with status %d", RESTART_GRACE_S, protocol.RESTART_STATUS)
        _exit_now()
    threading.Thread(target=sweep, name="restart", daemon=True).start()


def _hang_up_nbd_clients() -> int:
    """shutdown(2) every NBD client connection of this process: a connected
    socket whose local address is that of a listening socket nbdkit owns
    (every listening socket but our control and gate sockets).  Returns
    how many."""
    ours = {_slave.server.address, _slave.server.control_path,
            getattr(_slave, "gate_path", None)}
    listening, connected = set(), []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue            # gone meanwhile, or not a socket
        try:
            if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
                continue
            local = sock.getsockname()
            key = local if sock.family == socket.AF_UNIX else local[1]
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                if not key or key in ours or (
                        sock.family != socket.AF_UNIX
                        and any(str(a).endswith(f":{key}") for a in ours if a)):
                    continue
                listening.add(key)
            else:
                connected.append((key, sock.dup()))
        except OSError:
            pass
        finally:
            sock.close()
    hung = 0
    for key, sock in connected:
        try:
            if key and key in listening:
                sock.shutdown(socket.SHUT_RDWR)
                hung += 1
        except OSError:
            pass
        finally:
            sock.close()
    return hung


def _exit_now():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def cleanup():
    if _lease is not None:
        _lease.stop()
    if _slave is not None:
        _slave.shutdown()
    if _exit_status is not None:
        # nbdkit has closed its connections and unloads us: nothing of
        # ours is left open; exit with the status that says "start me again".
        log.info("exiting with status %d: start me again (my role is recorded)",
                 _exit_status)
        _exit_now()


def list_exports(readonly, is_tls):
    # Host exports only: a secondary's replication export name is a secret.
    return list(_slave.volumes)


def default_export(readonly, is_tls):
    return next(iter(_slave.volumes))


def open(readonly):
    name = nbdkit.export_name() or next(iter(_slave.volumes))
    if isinstance(_slave, Secondary):
        try:
            vol = _slave.open_export(name)
        except LookupError:
            nbdkit.set_error(errno.ENXIO)   # a host export with nothing hardened yet
            raise
    else:
        vol = _slave.volumes.get(name)
    if vol is None:
        # A client's mistake, not ours: nbdkit logs it and refuses the open.
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no export named {name!r} (exports: {', '.join(_slave.volumes)})")
    return vol


def get_size(h):
    return h.size


def block_size(h):
    return (1, 4096, 0xFFFFFFFF)


def can_write(h):
    # A secondary's host export (HostView) is read-only.
    return getattr(h, "writable", True)


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # Every connection shares one fd per volume: a flush (fdatasync) on any
    # connection makes every completed write durable.
    return True


def close(h):
    # nbdkit has ended this connection's worker threads by now: free the
    # Python thread states they kept (nbdplugin/threadstate.py).
    threadstate.release_dead()


# Every I/O callback starts with ``threadstate.keep()``: without it each
# request builds and destroys a Python thread state, the largest CPU cost
# of a small request (nbdplugin/threadstate.py).

def _io(fn, *args):
    threadstate.keep()
    try:
        fn(*args)
    except OSError as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


def pread(h, buf, offset, flags):
    _io(h.pread, buf, offset)


def flush(h, flags):
    _io(h.flush)


# The write callbacks run once per request: each is one call into
# ``_write``, with the flag constants looked up once here.
_FUA = nbdkit.FLAG_FUA
_MAY_TRIM = nbdkit.FLAG_MAY_TRIM


def pwrite(h, buf, offset, flags):
    _write(h.pwrite, buf, offset, flags & _FUA)


def trim(h, count, offset, flags):
    _write(h.trim, count, offset, flags & _FUA)


def zero(h, count, offset, flags):
    _write(h.zero, count, offset, flags & _MAY_TRIM, flags & _FUA)


class _Unfenced:
    """The fence of a slave that has none: a secondary refuses host writes
    by itself (its host export is read-only), and its replication export
    is written by the primary's drain, which no switchover fence stops."""

    @staticmethod
    def enter():
        pass

    @staticmethod
    def leave():
        pass


_fence: Fence | _Unfenced = _Unfenced()   # the primary's Fence, set in get_ready


def _write(fn, *args):
    """A modifying request: on a primary it passes the switchover fence
    (``slave.Fence``); an OSError becomes nbdkit's errno (EROFS from the
    fence)."""
    threadstate.keep()
    fence = _fence
    try:
        fence.enter()
        try:
            fn(*args)
        finally:
            fence.leave()
    except OSError as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise
