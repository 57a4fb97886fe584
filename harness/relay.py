"""A delaying TCP relay: a WAN's round trip where the kernel has no netem.

    python -m harness.relay --one-way-ms 10 LISTEN_HOST:PORT=TO_HOST:PORT ...

Every byte that arrives on a listening address is sent on to its target
``one-way-ms`` later, and every byte of the answer likewise: a request and
its reply cost one round trip of 2 x one-way-ms, and requests in flight
overlap as they do on a wire (each direction is a queue of (due time,
bytes), drained by its own thread).  TLS passes through untouched: the
relay sees only ciphertext, the two ends authenticate each other.  Prints
``ready`` on stdout once every address listens; stops on SIGTERM.

Why a relay and not nbdkit's ``delay`` filter on the secondary: the filter
sleeps in nbdkit's worker thread, so a server with N threads has at most N
requests in their delay at once -- the "link" then carries N requests per
round trip whatever its bandwidth, which is a thread limit, not a round
trip -- and it delays only NBD, never the control channel's PREPARE and
COMMIT that the harden pays over a real link.  Rate limits stay with the
kernel (``tbf`` on the site's link, harness/sites.py): the relay adds time,
never bandwidth limits.

What it does not model: TCP's own window over the delayed path.  The
relay acknowledges at once and holds up to QUEUE_BYTES a direction, so a
sender is limited by what its application keeps in flight (NBD requests,
control calls), never by a TCP window -- a link whose windows cover its
bandwidth-delay product (Linux autotunes to 6 MiB; 1 Gbit/s x 20 ms is
2.5 MB), without slow start after idle.

The relay runs in the receiving site's namespace, listening on that site's
address, and forwards to the real server on the same port of 127.0.0.1
there; the server's certificate names the site's address, which is what
the client dialled.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 256 << 10
# Bytes a direction may hold before its reader stops reading (TCP's own
# flow control then pushes back on the sender): far above any bandwidth-
# delay product the benches ask for (1 Gbit/s x 10 ms = 1.25 MB).
QUEUE_BYTES = 64 << 20


def _parse(pair: str) -> tuple[tuple[str, int], tuple[str, int]]:
    try:
        src, dst = pair.split("=")
        return _addr(src), _addr(dst)
    except ValueError:
        raise SystemExit(f"relay: {pair!r} is not LISTEN_HOST:PORT=TO_HOST:PORT") from None


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


class _Conn:
    """One relayed connection: its two sockets, closed once both directions
    have ended (or at once when one fails)."""

    def __init__(self, a: socket.socket, b: socket.socket):
        self.socks, self.ended, self.lock = (a, b), 0, threading.Lock()
        self.failed = threading.Event()

    def end(self, failed: bool) -> None:
        with self.lock:
            self.ended += 1
            last = self.ended == 2
        if failed:
            self.failed.set()
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if last:
            for s in self.socks:
                s.close()


def _direction(src: socket.socket, dst: socket.socket, delay: float, conn: _Conn) -> None:
    """Copy ``src`` to ``dst``, each chunk ``delay`` s after it arrived."""
    q: queue.Queue = queue.Queue()
    # Bytes taken and bytes sent, each counted by one thread only (no lock);
    # a full queue is rare, so the reader polls for room.
    taken, sent = [0], [0]

    def reader() -> None:
        try:
            while True:
                while taken[0] - sent[0] >= QUEUE_BYTES:
                    time.sleep(0.001)
                data = src.recv(CHUNK)
                taken[0] += len(data)
                q.put((time.monotonic() + delay, data))
                if not data:
                    return
        except OSError:
            q.put((0.0, None))

    def writer() -> None:
        try:
            while True:
                due, data = q.get()
                if data is None:            # the other side failed: tear down
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:                # end of stream, passed on in order
                    dst.shutdown(socket.SHUT_WR)
                    conn.end(False)
                    return
                dst.sendall(data)
                sent[0] += len(data)
        except OSError:
            pass
        conn.end(True)

    for fn in (reader, writer):
        threading.Thread(target=fn, daemon=True).start()


def _serve(listener: socket.socket, target: tuple[str, int], delay: float) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            up = socket.create_connection(target, timeout=10)
        except OSError as exc:
            print(f"relay: cannot reach {target[0]}:{target[1]}: {exc}", file=sys.stderr,
                  flush=True)
            conn.close()
            continue
        up.settimeout(None)
        for s in (conn, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Conn(conn, up)
        _direction(conn, up, delay, pair)
        _direction(up, conn, delay, pair)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one-way-ms", type=float, required=True,
                    help="delay each way (a round trip costs twice this)")
    ap.add_argument("pairs", nargs="+", metavar="LISTEN_HOST:PORT=TO_HOST:PORT")
    a = ap.parse_args(argv)
    if not a.one_way_ms >= 0:
        raise SystemExit(f"relay: --one-way-ms must be >= 0, not {a.one_way_ms}")
    delay = a.one_way_ms / 1000
    threads = []
    for pair in a.pairs:
        src, dst = _parse(pair)
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(src)
        ls.listen(64)
        threads.append(threading.Thread(target=_serve, args=(ls, dst, delay), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
