"""Copy the PiT image of one volume to an NBD target with libnbd.

Runs of blocks to send are merged up to ``MAX_RUN`` bytes and written with
``aio_pwrite``, at most ``inflight`` requests in flight.  Runs come from one
bitmap and never overlap, so no two writes in flight touch the same bytes.
A block is confirmed (its ``oos`` bit cleared) when the target acknowledges
its write; the copy ends with a flush of the target.  If the target stops
answering for ``timeout`` seconds, or fails a request, the copy fails with a
one-line error and what was not confirmed stays marked: nothing is lost and
nothing confirmed is sent again by the next incremental copy.
"""

from __future__ import annotations

import threading
import time

import nbd

from native.bitmap import Bitmap

from . import failpoints

MAX_RUN = 1 << 20


class CopyError(Exception):
    """A copy could not finish; ``fault`` says whose fault: "target" or "source"."""

    def __init__(self, message: str, fault: str = "target"):
        super().__init__(message)
        self.fault = fault


def connect(uri: str, name: str) -> "nbd.NBD":
    h = nbd.NBD()
    h.set_handle_name(name)
    try:
        h.connect_uri(uri)
    except nbd.Error as exc:
        raise CopyError(f"cannot reach target {uri}: {exc.string}") from exc
    return h


class Copy:
    """One volume's copy of PiT n to one target; progress readable any time."""

    def __init__(self, volume, uri: str, blocks: Bitmap, inflight: int = 8,
                 timeout: float = 30.0):
        self.volume = volume
        self.uri = uri
        self.blocks = blocks
        self.inflight = inflight
        self.timeout = timeout
        g = volume.granularity
        self.total_bytes = sum(min(length * g, volume.size - start * g)
                               for start, length in blocks.iter_runs())
        self.done_bytes = 0
        self.state = "running"
        self.error: str | None = None
        self.fault: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None

    def progress(self) -> dict:
        end = self.finished or time.monotonic()
        return {"target": self.uri, "state": self.state, "error": self.error,
                "fault": self.fault,
                "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "seconds": round(end - self.started, 3)}

    def run(self) -> None:
        try:
            self._run()
            self.state = "done"
        except CopyError as exc:
            self.state, self.error, self.fault = "failed", str(exc), exc.fault
        except Exception as exc:  # a bug or a local I/O error: report, don't hide
            self.state, self.error = "failed", f"source {self.volume.name}: {exc}"
            self.fault = "source"
        finally:
            self.finished = time.monotonic()

    def _run(self) -> None:
        vol, pit = self.volume, self.volume.pit
        g = vol.granularity
        h = connect(self.uri, f"cgmirror-copy-{vol.name}")
        try:
            size = h.get_size()
            if size < vol.size:
                raise CopyError(f"target {self.uri} is too small for {vol.name}:"
                                f" {size} bytes, needs {vol.size}")
            if h.is_read_only():
                raise CopyError(f"target {self.uri} is read-only")
            can_zero = h.can_zero()
            # One buffer per request in flight, reused: allocating 1 MiB per
            # run cost more than the copy itself.
            free = [bytearray(MAX_RUN) for _ in range(self.inflight)]
            pending: dict[int, tuple[int, int, int, bytearray]] = {}
            halfway = self.total_bytes // 2
            last_progress = time.monotonic()

            def reap(wait: bool) -> None:
                nonlocal last_progress
                if wait:
                    if h.poll(1000) == 0 and time.monotonic() - last_progress > self.timeout:
                        raise CopyError(f"target {self.uri} did not answer for"
                                        f" {self.timeout:.0f} s")
                while pending and (cookie := h.aio_peek_command_completed()) > 0:
                    start, nblocks, length, buf = pending.pop(cookie)
                    free.append(buf)
                    try:
                        h.aio_command_completed(cookie)
                    except nbd.Error as exc:
                        raise CopyError(f"target {self.uri} failed a write at"
                                        f" {start * g}: {exc.string}") from exc
                    vol.changes.confirm(start, nblocks)
                    pit.confirm(start, nblocks)
                    self.done_bytes += length
                    last_progress = time.monotonic()
                    if self.done_bytes >= halfway:
                        failpoints.hit("copy:mid")

            per_run = max(1, MAX_RUN // g)
            for start, nblocks in self.blocks.iter_runs(max_run=per_run):
                if self.cancelled.is_set():
                    raise CopyError("copy cancelled", "source")
                if pit is None or pit.broken:
                    raise CopyError(pit.broken if pit else f"{vol.name}: PiT dropped",
                                    "source")
                while not free:
                    reap(True)
                buf = free.pop()
                length = min(nblocks * g, vol.size - start * g)
                view = memoryview(buf)[:length]
                pit.read(view, start)
                data = nbd.Buffer.from_buffer(view)
                try:
                    if can_zero and data.is_zero():
                        # A zero run costs the link nothing and the target
                        # may punch a hole for it.
                        cookie = h.aio_zero(length, start * g)
                    else:
                        cookie = h.aio_pwrite(data, start * g)
                except nbd.Error as exc:
                    raise CopyError(f"target {self.uri}: {exc.string}") from exc
                pending[cookie] = (start, nblocks, length, buf)
                reap(False)
            while pending:
                reap(True)
            if pit.broken:
                raise CopyError(pit.broken, "source")
            if h.can_flush():
                try:
                    h.flush()
                except nbd.Error as exc:
                    raise CopyError(f"target {self.uri} failed to flush: {exc.string}") \
                        from exc
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass  # the copy's outcome is already decided
