"""Cost of mutual TLS 1.3 (wire.tls contexts, pki certificates) on loopback,
against a unix socket, for a control-sized message (one short line).

    .venv/bin/python bench/bench_tls.py [--n 2000] [--connects 200]

A thread echoes lines on a unix socket and on 127.0.0.1 TCP with
``server_context``.  Timed, per transport:

  connect   connect (+ TLS handshake, both certificates checked) + one round trip
  rtt       one round trip on an open connection (what a control op costs)

Medians and p99 in microseconds; TCP+TLS ratios against unix.  The last line
printed is JSON; everything before it is for people.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from coordinator import pki  # noqa: E402
from wire import tls  # noqa: E402

LINE = b'{"op":"status","id":1}\n'


def echo_forever(listener, wrap) -> None:
    """Serve each connection in a thread: echo lines until EOF."""
    def serve(conn):
        with conn:
            try:
                s = wrap(conn)
                f = s.makefile("rwb", buffering=0)
                while line := f.readline():
                    f.write(line)
            except OSError:
                pass
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def nodelay(s: socket.socket) -> socket.socket:
    # Without it a handshake costs 40 ms: Nagle holds a small TLS record
    # until the peer's delayed ACK.  The control channel must set it too.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def round_trip(f) -> None:
    f.write(LINE)
    if f.readline() != LINE:
        raise SystemExit("echo mismatch")


def measure(connect, n: int, connects: int) -> dict:
    conn_us = []
    for _ in range(connects):
        t = time.perf_counter()
        s = connect()
        f = s.makefile("rwb", buffering=0)
        round_trip(f)
        conn_us.append((time.perf_counter() - t) * 1e6)
        f.close()
        s.close()
    s = connect()
    f = s.makefile("rwb", buffering=0)
    for _ in range(100):        # warm up
        round_trip(f)
    rtt_us = []
    for _ in range(n):
        t = time.perf_counter()
        round_trip(f)
        rtt_us.append((time.perf_counter() - t) * 1e6)
    f.close()
    s.close()
    q = lambda xs, p: sorted(xs)[int(len(xs) * p / 100) - 1]   # noqa: E731
    return {"connect_p50_us": round(statistics.median(conn_us), 1),
            "connect_p99_us": round(q(conn_us, 99), 1),
            "rtt_p50_us": round(statistics.median(rtt_us), 1),
            "rtt_p99_us": round(q(rtt_us, 99), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips timed")
    ap.add_argument("--connects", type=int, default=200, help="connects timed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cgm-bench-") as d:
        pki.init(os.path.join(d, "pki"), "bench")
        server = tls.HostFiles(pki.issue(os.path.join(d, "pki"), "server",
                                         ips=["127.0.0.1"]))
        client = tls.HostFiles(pki.issue(os.path.join(d, "pki"), "client"))
        sctx, cctx = server.server_context(), client.client_context()

        path = os.path.join(d, "echo.sock")
        ux = socket.socket(socket.AF_UNIX)
        ux.bind(path)
        ux.listen(64)
        tcp = socket.create_server(("127.0.0.1", 0), backlog=64)
        port = tcp.getsockname()[1]
        threading.Thread(target=echo_forever, args=(ux, lambda c: c), daemon=True).start()
        threading.Thread(target=echo_forever,
                         args=(tcp, lambda c: sctx.wrap_socket(nodelay(c), server_side=True)),
                         daemon=True).start()

        def unix_connect():
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            return s

        def tls_connect():
            s = nodelay(socket.create_connection(("127.0.0.1", port)))
            return cctx.wrap_socket(s, server_hostname="127.0.0.1")

        try:
            res = {"unix": measure(unix_connect, args.n, args.connects),
                   "tcp_tls": measure(tls_connect, args.n, args.connects)}
        finally:
            ux.close()
            tcp.close()
    u, t = res["unix"], res["tcp_tls"]
    res["rtt_ratio_p50"] = round(t["rtt_p50_us"] / u["rtt_p50_us"], 2)
    res["connect_ratio_p50"] = round(t["connect_p50_us"] / u["connect_p50_us"], 1)
    for k in ("unix", "tcp_tls"):
        print(f"{k:8} connect+rtt p50 {res[k]['connect_p50_us']:8.1f} us"
              f"  p99 {res[k]['connect_p99_us']:8.1f} us   rtt p50"
              f" {res[k]['rtt_p50_us']:6.1f} us  p99 {res[k]['rtt_p99_us']:6.1f} us")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
