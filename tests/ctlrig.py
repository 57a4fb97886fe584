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
