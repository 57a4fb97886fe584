"""Small clients of a slave's sockets for tests that speak to them raw: the
control socket (tests/test_control_server.py) and the gate socket
(tests/test_gate_socket.py)."""

import socket

import nbd


def connect_nbd(proc, vol="a"):
    """A libnbd handle on ``proc``'s export ``vol``."""
    h = nbd.NBD()
    h.set_handle_name(f"test-{vol}")
    h.connect_uri(proc.spec.uri(vol))
    return h


def raw(path, timeout=10.0):
    """A connected unix socket, nothing said yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_line(s) -> bytes:
    """One reply line (b"" if the peer closed first)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def log_text(proc) -> str:
    """What the slave wrote to its log so far."""
    with open(proc.spec.logfile, errors="replace") as f:
        return f.read()


def assert_aborted_by_its_connection(proc, n, marked) -> None:
    """Cut ``n`` ended because the connection that froze it went away: the
    slave is idle with n aborted, volume a's changes are exactly the blocks
    ``marked``, and the log says why."""
    with proc.control() as c:
        st = c.call("status")
        assert (st["phase"], st["n"], st["ended"]) == ("idle", n, "aborted")
        runs = c.dirty_runs("a")
    assert {b for start, count in runs for b in range(start, start + count)} == marked
    assert "the connection that froze it ended" in log_text(proc)
