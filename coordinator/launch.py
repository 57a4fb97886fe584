"""Start and stop slave processes (nbdkit running plugin.py).

Used by the ``cgmirror slave|secondary|node`` commands and by the tests, so
that nobody types nbdkit command lines by hand.  A slave is ready when nbdkit
has written its pidfile (it does so once it listens) and its control socket
answers.

Roles.  A node records its role in its own state directory (``node.json``,
written by the node before it acts on it, nbdplugin/); the role a spec gives
is only the first one.  ``in_recorded_role`` reads the record, so every start
(``start``, ``exec_foreground``, ``supervise``) names the role the plugin will
run in anyway.  A role change is an op the node serves itself: it records the
new role and nbdkit exits with ``protocol.RESTART_STATUS``; whoever supervises
it starts it again -- systemd (the unit's ``RestartForceExitStatus=``), or
``supervise`` (``cgmirror node run``, and every detached start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from wire import address as wire_address
from wire import files, noderole, tls, unixsock
from wire.protocol import RESTART_STATUS

from .control import ControlClient, ControlError, client_context

# The plugin runs inside nbdkit; this module (the client side) only names it.
PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "nbdplugin", "plugin.py")
# Where the interpreter nbdkit embeds keeps its ``python3`` (the system's).
SYSTEM_BIN = ("/usr/bin", "/bin")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The supervisor's pidfile in the node's state directory: "PID START_TIME".
SUPERVISOR_PID = "supervisor.pid"
# ``supervise`` gives up when the node asks to be started again this many
# times within RESTART_WINDOW seconds (systemd's default start limit, 5 in
# 10 s): a role change is rare, a loop of them is a bug to report.
RESTART_BURST = 5
RESTART_WINDOW = 10.0


class LaunchError(Exception):
    """A slave could not be started or stopped; the message says what to do."""


@dataclass
class SlaveSpec:
    """How to run one slave.  ``volumes``: (name, path, size or None)."""

    name: str
    statedir: str
    nbd_socket: str
    control: str
    volumes: list[tuple[str, str, int | None]]
    granularity: int = 64 * 1024
    region: int = 4 << 20
    # nbdkit worker threads per connection.  Measured with fio (4K random
    # writes, qd16, bench-write's threads_sweep_iops): 1 thread ~51K IOPS,
    # 2 ~30K, 4 ~26K -- Python threads only fight over the GIL.  The price:
    # while a freeze holds a write (a fraction of a millisecond), later
    # requests on that connection wait behind it; other connections and the
    # control channel do not.
    threads: int = 1
    checkpoint: float = 2.0
    filters: list[str] = field(default_factory=list)   # e.g. ["error"]
    filter_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    role: str = "primary"           # or "secondary" (nbdplugin/secondary.py)
    # TCP and TLS (see docs/TLS.md).  ``nbd``: a tcp:HOST:PORT to serve NBD
    # on instead of ``nbd_socket`` (always mutual TLS).  ``tls``: this
    # slave's certificate directory (plugin key tls=: its control server's
    # and its copier's certificate).  ``client_tls``: the certificate
    # directory the coordinator presents to this slave's TCP control.
    nbd: str | None = None
    tls: str | None = None
    client_tls: str | None = None
    # The session this node belongs to (plugin keys session= and node=, the
    # node's name being ``name``): the node records both at its first start
    # and refuses later starts as another node or for another session.
    session: str | None = None
    # The write lease (issue 19, ``[cluster] fence = "lease"``;
    # nbdplugin/writelease.py): the node's site (a: the file's [[slave]]
    # nodes, b: its [[secondary]] nodes), the etcd endpoints (https, the
    # node's ``tls`` is its client certificate), the lease's ttl in whole
    # seconds and the key prefix.  ``fence`` "none": none of them is passed.
    fence: str = "none"
    etcd: list[str] = field(default_factory=list)
    site: str | None = None
    lease_ttl: int | None = None
    etcd_prefix: str | None = None

    def with_cluster(self, cluster, site: str) -> "SlaveSpec":
        """This spec with the write-lease keys of ``cluster`` (a session's
        ClusterConfig, or None) for a node of ``site``; unchanged unless its
        fence is "lease"."""
        if cluster is None or getattr(cluster, "fence", "none") != "lease":
            return self
        return dataclasses.replace(self, fence="lease", etcd=list(cluster.etcd), site=site,
                                   lease_ttl=cluster.lease_ttl_s,
                                   etcd_prefix=getattr(cluster, "prefix", None))

    @property
    def pidfile(self) -> str:
        return os.path.join(self.statedir, "nbdkit.pid")

    @property
    def logfile(self) -> str:
        return os.path.join(self.statedir, "nbdkit.log")

    @property
    def supervisor_pidfile(self) -> str:
        return os.path.join(self.statedir, SUPERVISOR_PID)

    def to_json(self) -> str:
        """This spec as one JSON text (how a detached supervisor gets it)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SlaveSpec":
        d = json.loads(text)
        d["volumes"] = [tuple(v) for v in d["volumes"]]
        return cls(**d)

    def uri(self, volume: str) -> str:
        if self.nbd is not None:
            a = wire_address.parse(self.nbd)
            host = f"[{a.host}]" if ":" in a.host else a.host
            return f"nbds://{host}:{a.port}/{volume}"
        return f"nbd+unix:///{volume}?socket={self.nbd_socket}"

    def client_context(self):
        """The coordinator's TLS context for this slave's control, or None
        (unix control, or no certificate directory given)."""
        return client_context(self.client_tls) if self.client_tls else None

    def _listen(self) -> list[str]:
        """nbdkit's listening options: a unix socket, or TCP with mutual TLS."""
        if self.nbd is None:
            return ["-U", self.nbd_socket]
        if not self.tls:
            raise LaunchError(f"slave {self.name}: NBD on {self.nbd} needs a certificate"
                              f" directory (tls); plaintext TCP is refused")
        a = wire_address.parse(self.nbd, listen=True)
        return ["-i", a.host, "-p", str(a.port), *tls.nbdkit_args(self.tls)]

    def command(self) -> list[str]:
        cmd = ["nbdkit", "-f", *self._listen(), "--pidfile", self.pidfile,
               "--threads", str(self.threads)]
        for f in self.filters:
            cmd += ["--filter", f]
        cmd += ["python", PLUGIN, f"statedir={self.statedir}", f"control={self.control}",
                f"granularity={self.granularity}", f"region={self.region}",
                f"checkpoint={self.checkpoint}", f"role={self.role}"]
        if self.session:
            cmd += [f"session={self.session}", f"node={self.name}"]
        if self.tls:
            cmd.append(f"tls={os.path.abspath(self.tls)}")
        if self.fence == "lease":
            cmd += ["fence=lease", f"etcd={','.join(self.etcd)}", f"site={self.site}"]
            if self.lease_ttl is not None:
                cmd.append(f"lease_ttl={self.lease_ttl}")
            if self.etcd_prefix and self.etcd_prefix != "/cgmirror":
                cmd.append(f"etcd_prefix={self.etcd_prefix}")
        for name, path, size in self.volumes:
            cmd.append(f"volume={name}:{path}")
            if size is not None:
                cmd.append(f"create={name}:{size}")
        return cmd + list(self.filter_args)


class SlaveProcess:
    """A running slave started by us: our child (``popen``), or, when started
    detached, a daemon known by the pid in its pidfile."""

    def __init__(self, spec: SlaveSpec, pid: int, popen: subprocess.Popen | None = None,
                 keeper: int | None = None):
        self.spec = spec
        self.pid = pid
        self.popen = popen
        self.keeper = keeper        # detached: its supervisor (``supervise``)

    def control(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient(self.spec.control, timeout, self.spec.client_context())

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        for pid in (self.pid, self.keeper):
            if pid:
                _reap(pid)
        if self.keeper and not alive(self.pid) and alive(self.keeper):
            # Its supervisor started it again (a role change): same node.
            self.pid = running_pid(self.spec) or self.pid
        return alive(self.pid)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to end; return its status if it was our child."""
        if self.popen is not None:
            return self.popen.wait(timeout=timeout)
        if not wait_gone(self.pid, timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return None

    def kill9(self) -> int | None:
        """SIGKILL and reap; return the exit status (if it was our child)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        return self.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (clean shutdown: change maps checkpointed), then reap.

        nbdkit 1.32 exits on SIGTERM only once its clients have disconnected;
        past ``timeout`` the slave is killed, which is safe (recovery re-marks
        the regions written lately) but over-marks.
        """
        if self.keeper and alive(self.keeper):
            # Its supervisor forwards SIGTERM and exits, starting nothing new
            # (SIGTERM to nbdkit alone could meet a restart in between).
            try:
                os.kill(self.keeper, signal.SIGTERM)
            except ProcessLookupError:
                pass                # ended (and was reaped) just now
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(30)
        if self.keeper and wait_gone(self.keeper, 5):
            _reap(self.keeper)      # it exits right after nbdkit
        remove_stale(*_unix_paths(self.spec))
        return self.popen.returncode if self.popen is not None else None


def alive(pid: int) -> bool:
    """True while pid runs.  A zombie counts as gone: a daemon's parent may
    have exited, and not every init reaps orphans promptly."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to end (a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove(*paths: str) -> None:
    """Unlink each path that exists (pidfiles; sockets go by ``remove_stale``)."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_stale(*paths: str) -> None:
    """Unlink each socket that no live process serves (after a stop: the
    same path may serve another slave by now, which keeps it)."""
    for p in paths:
        unixsock.remove_stale(p)


def _reap(pid: int) -> None:
    """Collect a detached slave that was our child and has ended, so that
    it does not stay a zombie of a long-lived caller (tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass            # not our child: its own parent or init reaps it


def running_pid(spec: SlaveSpec) -> int | None:
    """PID of a live nbdkit serving this spec's control socket, if any."""
    try:
        with open(spec.pidfile) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    try:
        p = psutil.Process(pid)
        if p.status() != psutil.STATUS_ZOMBIE and \
                f"control={spec.control}" in p.cmdline():
            return pid
    except psutil.Error:
        pass
    return None


def supervisor_pid(spec: SlaveSpec) -> int | None:
    """PID of the live supervisor (``supervise``) of this spec's node, if any."""
    try:
        with open(spec.supervisor_pidfile) as f:
            pid, started = f.read().split()
        p = psutil.Process(int(pid))
        if p.status() != psutil.STATUS_ZOMBIE and f"{p.create_time():.2f}" == started:
            return p.pid
    except (FileNotFoundError, ValueError, psutil.Error):
        pass
    return None


def recorded_role(statedir: str) -> str | None:
    """The role the node recorded in ``STATEDIR/node.json``, or None before
    its first start (wire/noderole.py).  Raises LaunchError (one line) on a
    damaged record."""
    try:
        return noderole.recorded_role(statedir)
    except noderole.NodeRoleError as exc:
        raise LaunchError(str(exc)) from None


def in_recorded_role(spec: SlaveSpec) -> SlaveSpec:
    """``spec`` in the role its node recorded (unchanged before the first
    start: then the spec's role is the first one)."""
    role = recorded_role(spec.statedir)
    return spec if role in (None, spec.role) else dataclasses.replace(spec, role=role)


# TLS handshakes that failed in a row before a start gives up (not 1: a
# handshake can also fail on a socket the slave closes as it starts).
TLS_REFUSALS = 3


def _tls_refusal(exc: ControlError) -> bool:
    """The slave took the TCP connection and the TLS handshake failed."""
    return isinstance(exc.__cause__, ssl.SSLError)


def start(spec: SlaveSpec, timeout: float = 30.0, detach: bool = False) -> SlaveProcess:
    """Start a slave and wait until it answers; raise LaunchError if it cannot.

    By default the slave is our child and runs in the foreground (``nbdkit
    -f``, which also makes it die with us: nbdkit 1.32 sets
    PR_SET_PDEATHSIG).  ``detach`` makes the slave outlive the process that
    started it (``cgmirror slave start``): its supervisor (``supervise``, in
    a session of its own) runs ``nbdkit -f`` as its child and starts it
    again after a role change; the supervisor is the ``keeper``, whose exit
    status is nbdkit's last.  Not nbdkit's own daemon mode: it points stderr
    at /dev/null (server/background.c, unless verbose), which lost every
    line the node logs -- refused TLS handshakes, the plugin's errors --
    from its log file.  The node starts in its recorded role
    (``in_recorded_role``).
    """
    spec = in_recorded_role(spec)
    sup = supervisor_pid(spec)
    if sup:
        raise LaunchError(f"slave {spec.name} is already running under its supervisor"
                          f" (pid {sup})")
    cmd = prepare(spec)
    try:
        ctx = spec.client_context()
    except tls.TLSConfigError as exc:
        raise LaunchError(f"slave {spec.name}: {exc}") from exc
    fd = os.open(spec.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)     # also a log left by an older version
    with os.fdopen(fd, "ab") as log:
        log_start = log.tell()
        if detach:
            keeper = _spawn_detached(log.fileno(), spec)
            proc = SlaveProcess(spec, keeper, keeper=keeper)   # pid: nbdkit's, below
        else:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, env=slave_env(spec.env))
            proc = SlaveProcess(spec, popen.pid, popen)
    deadline = time.monotonic() + timeout
    refused: ControlError | None = None      # the last TLS refusal, if any
    refusals = 0                             # ... and how many in a row
    while True:
        status = _exit_status(proc)
        if status is not None:
            raise LaunchError(f"slave {spec.name} exited with status {status}:"
                              f" {_tail(spec.logfile, log_start)}")
        control_up = _is_tcp(spec.control) or os.path.exists(spec.control)
        if os.path.exists(spec.pidfile) and control_up:
            if detach:
                proc.pid = running_pid(spec) or proc.pid
            try:
                with ControlClient(spec.control, 5, ctx) as c:
                    answered = c.call("status").get("pid")
            except ControlError as exc:
                answered, refused = None, exc
                refusals = refusals + 1 if _tls_refusal(exc) else 0
            # Another process may serve this path (ours then refuses to start).
            if answered == proc.pid:
                # nbdkit sets its own umask (022), so the caller's cannot
                # help; the directories around are 0700 in any case.
                os.chmod(spec.pidfile, 0o600)
                return proc
        # A slave that completes TCP and then fails the TLS handshake is up:
        # its certificate (or ours) is wrong, which waiting does not mend.
        if time.monotonic() > deadline or refusals >= TLS_REFUSALS:
            # A slave that never answered must not outlive this error.
            if detach:
                proc.pid = running_pid(spec) or _child_of(keeper) or proc.pid
            if proc.alive():
                proc.kill9()
            if refusals:
                # TLS: the slave runs but we cannot talk to it; say why.
                raise LaunchError(f"slave {spec.name} serves, but refuses us or we"
                                  f" refuse it: {refused}")
            raise LaunchError(f"slave {spec.name} not ready after {timeout:.0f} s:"
                              f" {_tail(spec.logfile, log_start)}")
        time.sleep(0.02)


# A detached supervisor: this interpreter, this project, the spec as JSON.
_SUPERVISOR = ("import sys; sys.path.insert(0, {root!r});"
               " from coordinator.launch import supervise_main;"
               " sys.exit(supervise_main(sys.argv[1]))")


def _spawn_detached(log_fd: int, spec: SlaveSpec) -> int:
    """Start the supervisor of ``spec`` (``supervise``) in a session of its
    own, stdout and stderr on ``log_fd``; return its pid.  Its exit status is
    nbdkit's last.  posix_spawn rather than Popen: a Popen object dropped
    while its child runs warns, and a detached slave is meant to outlive
    the object (``_reap`` collects the supervisor if it ends first)."""
    cmd = [sys.executable, "-c", _SUPERVISOR.format(root=ROOT), spec.to_json()]
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        return os.posix_spawn(cmd[0], cmd, dict(os.environ), setsid=True,
                              file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                            (os.POSIX_SPAWN_DUP2, log_fd, 1),
                                            (os.POSIX_SPAWN_DUP2, log_fd, 2)])
    except OSError as exc:
        raise LaunchError(f"cannot run {cmd[0]} for slave {spec.name}:"
                          f" {exc.strerror or exc}") from exc
    finally:
        os.close(devnull)


class _Supervisor:
    """State of ``supervise``: the nbdkit it runs now, and whether a stop
    was asked (SIGTERM or SIGINT), which the signal handler sets."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def on_signal(self, signum, frame) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def supervise(spec: SlaveSpec, say=None) -> int:
    """Run the node of ``spec`` in the foreground (``cgmirror node run``, a
    detached start) and start it again, in its newly recorded role, each
    time it exits ``RESTART_STATUS`` (a role change).  SIGTERM or SIGINT stop
    nbdkit cleanly (it is sent SIGTERM) and return 0; any other exit of
    nbdkit is returned as it is (128+N for signal N), for the caller's own
    supervisor (systemd, a test) to judge.  Raises LaunchError when a start
    fails before nbdkit runs, or after RESTART_BURST restarts in
    RESTART_WINDOW s.  ``say`` gets one line per restart (default: stderr).
    """
    say = say or (lambda line: print(f"cgmirror: {line}", file=sys.stderr, flush=True))
    state = _Supervisor()
    old = {sig: signal.signal(sig, state.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    me = psutil.Process()
    files.make_dirs(spec.statedir)
    files.write_atomic(spec.supervisor_pidfile,
                       f"{me.pid} {me.create_time():.2f}\n".encode(), sync=False)
    restarts: list[float] = []
    try:
        while not state.stopping:
            now = in_recorded_role(spec)
            cmd = prepare(now)
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=slave_env(now.env))
            state.child = child
            if state.stopping:              # the signal came before child was set
                child.send_signal(signal.SIGTERM)
            status = child.wait()
            state.child = None
            if state.stopping:
                return 0
            if status != RESTART_STATUS:
                return status if status >= 0 else 128 - status
            t = time.monotonic()
            restarts = [r for r in restarts if t - r < RESTART_WINDOW] + [t]
            if len(restarts) > RESTART_BURST:
                raise LaunchError(f"slave {spec.name} asked to be started again"
                                  f" {len(restarts)} times in {RESTART_WINDOW:.0f} s;"
                                  f" giving up: see its log")
            say(f"slave {spec.name} exited {status} (role change): starting it again"
                f" as {in_recorded_role(spec).role}")
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if supervisor_pid(spec) == me.pid:
            remove(spec.supervisor_pidfile)


def supervise_main(spec_json: str) -> int:
    """Entry of a detached supervisor (``_spawn_detached``): its errors are
    one line in the node's log, which ``start`` shows."""
    spec = SlaveSpec.from_json(spec_json)
    try:
        return supervise(spec)
    except LaunchError as exc:
        print(f"cgmirror: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _exit_status(proc: SlaveProcess) -> int | None:
    """The exit status of a slave we started that has ended, else None."""
    if proc.popen is not None:
        return proc.popen.poll()
    try:
        pid, status = os.waitpid(proc.keeper, os.WNOHANG)
    except ChildProcessError:
        return None if alive(proc.keeper) else -1
    return os.waitstatus_to_exitcode(status) if pid else None


def _child_of(pid: int) -> int | None:
    """The (first) child process of ``pid``, if any: a detached slave's
    nbdkit before its pidfile names it."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0].pid if children else None


def prepare(spec: SlaveSpec) -> list[str]:
    """Make a slave's directories and remove what a dead one left; return
    its nbdkit command line (foreground).  Shared by ``start`` and
    ``cgmirror slave run`` (systemd), so both run the slave the same way."""
    pid = running_pid(spec)
    if pid:
        raise LaunchError(f"slave {spec.name} is already running as pid {pid}")
    files.make_dirs(spec.statedir)
    for path in _unix_paths(spec):
        files.make_dirs(os.path.dirname(os.path.abspath(path)))
    # nbdkit 1.32 leaves its socket behind after SIGTERM; so may a crash.
    # Only a stale one goes: a socket another process still serves (a second
    # session naming the same paths) is refused, never replaced.  The control
    # socket is left to the slave, which applies the same rule.
    if spec.nbd is None:
        try:
            unixsock.claim(spec.nbd_socket, "NBD socket")
        except unixsock.SocketInUse as exc:
            raise LaunchError(f"slave {spec.name}: {exc}") from None
    remove(spec.pidfile)
    try:
        cmd = spec.command()
    except tls.TLSConfigError as exc:
        raise LaunchError(f"slave {spec.name}: {exc}") from exc
    # nbdkit as found on the caller's PATH, before slave_env reorders it.
    cmd[0] = shutil.which(cmd[0]) or cmd[0]
    return cmd


def exec_foreground(spec: SlaveSpec) -> None:
    """Become the slave (``cgmirror slave run``, a systemd unit's
    ExecStart): nbdkit in the foreground, logging to stderr (the journal),
    with our PID, so systemd's MAINPID, SIGTERM and the plugin's READY=1
    all concern nbdkit itself.  It starts in its recorded role; a role
    change's exit (RESTART_STATUS) is the unit's to restart.  Returns only
    by raising LaunchError."""
    spec = in_recorded_role(spec)
    cmd = prepare(spec)
    try:
        os.execve(cmd[0], cmd, slave_env(spec.env))
    except OSError as exc:
        raise LaunchError(f"cannot run {cmd[0]} for slave {spec.name}:"
                          f" {exc.strerror or exc}") from exc


def _is_tcp(address: str) -> bool:
    return address.startswith("tcp:")


def _unix_paths(spec: SlaveSpec) -> list[str]:
    """The unix sockets this slave makes (none for what it serves on TCP)."""
    paths = [] if spec.nbd is not None else [spec.nbd_socket]
    return paths + ([] if _is_tcp(spec.control) else [spec.control])


def slave_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a slave: ours plus ``extra``, made deterministic
    for the Python that nbdkit embeds.

    That interpreter takes its prefix from the first ``python3`` on PATH: a
    pyenv, conda or venv Python first on PATH (a script launched by pyenv,
    a tool's own venv) gives it another standard library and no ``nbd``
    module, and the slave does not start.  So the system's bin directories
    go first, and PYTHON* variables (PYTHONHOME, PYTHONPATH, ...) meant for
    some other Python are dropped unless ``extra`` sets them.  The plugin
    finds the project's own packages by itself (see plugin.py).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(extra)
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and p not in SYSTEM_BIN]
    env["PATH"] = os.pathsep.join([*SYSTEM_BIN, *path])
    return env


def stop(spec: SlaveSpec, timeout: float = 30.0) -> bool:
    """Stop a slave started earlier (maybe by another process) via its
    pidfile, and its supervisor if it has one (so that nothing starts it
    again)."""
    sup = supervisor_pid(spec)
    pid = running_pid(spec)
    if pid is None and sup is None:
        remove_stale(*_unix_paths(spec))
        return False
    if sup is not None:
        os.kill(sup, signal.SIGTERM)
    if pid is not None:
        SlaveProcess(spec, pid).stop(timeout)
    if sup is not None and not wait_gone(sup, timeout):
        os.kill(sup, signal.SIGKILL)
        wait_gone(sup, 30)
    remove_stale(*_unix_paths(spec))
    return True


def _tail(path: str, start: int = 0, lines: int = 5) -> str:
    """The last lines this start of the slave wrote to its log."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    ours = [line for line in text if line.startswith("cgmirror: error: ")]
    if ours:
        return ours[-1].removeprefix("cgmirror: error: ")
    return " | ".join(text[-lines:]) or "(empty log)"
