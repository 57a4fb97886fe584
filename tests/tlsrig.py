"""Pytest fixtures and helpers of the TLS tests (registered by
``pytest_plugins`` in tests/conftest.py, as tests/vmfixture.py is):

* ``certs`` (module): host directories from one session PKI (``pki``) --
  ``server`` (names 127.0.0.1 and localhost), ``good``, ``misnamed`` (names
  elsewhere.example only) -- and the bad clients, each trusting the
  session's CA so that a refusal is the server's: ``expired``,
  ``other-session`` (another session's certificate), ``foreign-ca`` (a
  trustme CA's), ``no-cert`` (the CA only); ``other-ca`` is another
  session's client that trusts only its own CA.
* ``memory_servers``: factory ``memory_servers(host_dir)`` starting an
  ``nbdkit memory 1M`` on 127.0.0.1 with mutual TLS, stopped at teardown.

``free_port()`` and ``Server`` serve tests that start their own nbdkit.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess

import psutil
import pytest

from cgtest import need, wait_until
from coordinator import pki
from wire import tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Host directories by role (see the module doc)."""
    import trustme

    root = tmp_path_factory.mktemp("pki")
    d = str(root / "sess")
    pki.init(d, "sess")
    dirs = {"server": pki.issue(d, "server", ips=["127.0.0.1"], dns=["localhost"]),
            "good": pki.issue(d, "client"),
            "misnamed": pki.issue(d, "elsewhere", dns=["elsewhere.example"])}
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    expired = pki.issue(d, "expired", days=1, valid_from=long_ago)
    other = str(root / "other")
    pki.init(other, "other")
    other_client = pki.issue(other, "client")
    # A foreign CA that has nothing to do with cgmirror.
    leaf = trustme.CA().issue_cert("client")
    fdir = root / "foreign"
    fdir.mkdir(mode=0o700)
    leaf.cert_chain_pems[0].write_to_path(str(fdir / tls.CLIENT_CERT))
    leaf.private_key_pem.write_to_path(str(fdir / tls.CLIENT_KEY))
    for name, src in (("expired", expired), ("other-session", other_client),
                      ("foreign-ca", str(fdir))):
        dirs[name] = _client_dir(root, name, src, d)
    nocert = root / "no-cert"
    nocert.mkdir(mode=0o700)
    shutil.copy(os.path.join(d, tls.CA_CERT), nocert / tls.CA_CERT)
    dirs["no-cert"] = str(nocert)
    dirs["other-ca"] = other_client
    return dirs


def _client_dir(root, name, cert_dir, ca_dir) -> str:
    """A client directory with ``cert_dir``'s certificate and ``ca_dir``'s CA."""
    out = root / f"client-{name}"
    out.mkdir(mode=0o700)
    for f in (tls.CLIENT_CERT, tls.CLIENT_KEY):
        shutil.copy(os.path.join(cert_dir, f), out / f)
        os.chmod(out / f, 0o600)
    shutil.copy(os.path.join(ca_dir, tls.CA_CERT), out / tls.CA_CERT)
    return str(out)


def free_port() -> int:
    """A loopback port nobody holds right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An nbdkit on 127.0.0.1:port; ``log()`` is what it wrote to stderr."""

    def __init__(self, cmd: list[str], logpath: str, port: int):
        self.port, self.logpath = port, logpath
        with open(logpath, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    def wait_ready(self) -> None:
        """Until nbdkit listens: seen in the kernel's socket table, not by
        connecting (a probe connection makes nbdkit log a reset now and
        then, and the tests read its log)."""
        def up():
            assert self.proc.poll() is None, f"nbdkit exited: {self.log()}"
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in psutil.Process(self.proc.pid).net_connections("tcp"))
        wait_until(up, timeout=30, what="nbdkit listening")

    def log(self) -> str:
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        # nbdkit 1.32 waits for its clients on SIGTERM: SIGKILL if it lingers.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def memory_servers(tmp_path):
    """Factory: ``nbdkit memory 1M`` on 127.0.0.1, mutual TLS from a host dir."""
    need("nbdkit")
    started = []

    def make(host_dir):
        port = free_port()
        srv = Server(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                      *tls.nbdkit_args(host_dir), "memory", "1M"],
                     str(tmp_path / f"nbdkit{len(started)}.log"), port)
        started.append(srv)
        srv.wait_ready()
        return srv

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()
