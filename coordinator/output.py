"""Output for people (tables, a progress bar, a redraw loop) and for machines (one
JSON document); the CLI's, and the mirror's log lines (rates)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import TextIO

CLEAR = "\x1b[H\x1b[2J"         # cursor home, clear screen (what watch(1) does)


def size(n: int | float | None) -> str:
    """Bytes for people: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rate(bytes_per_s: int | float | None) -> str:
    """A bandwidth for people, in the units of ``size``: '50.0 MiB/s';
    None or 0 (no limit) is 'unlimited'."""
    return size(bytes_per_s) + "/s" if bytes_per_s else "unlimited"


def eta(done: int, total: int, seconds: float) -> str:
    """Time left at the average speed so far: '1 min 05 s', '-' if unknown."""
    if done <= 0 or seconds <= 0 or total <= done:
        return "-" if total > done else "0 s"
    return duration((total - done) / (done / seconds))


def duration(left: float) -> str:
    """A time span for people: '42 s', '1 min 05 s', '2 h 03 min'."""
    if left >= 3600:
        return f"{int(left // 3600)} h {int(left % 3600 // 60):02d} min"
    if left >= 60:
        return f"{int(left // 60)} min {int(left % 60):02d} s"
    return f"{left:.0f} s"


def age(seconds: float | None) -> str:
    """How long ago, for people: 42 -> '42 s ago', 7200 -> '2.0 h ago'."""
    if seconds is None:
        return "-"
    for unit, width in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= width:
            return f"{seconds / width:.1f} {unit} ago"
    return f"{seconds:.0f} s ago"


def table(rows: list[list[object]], header: list[str], out: TextIO) -> None:
    """Columns padded to the widest cell; the last column is not padded."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    for r in cells:
        line = "  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c
                         for i, c in enumerate(r))
        print(line.rstrip(), file=out)


def emit_json(doc: dict, out: TextIO) -> None:
    """Exactly one JSON document, then a newline."""
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")
    out.flush()


class PipeSafe:
    """Standard output whose reader may go away (``cgmirror history | head``).

    The command goes on to its end -- a failover must not stop half way
    because nobody reads its progress any more -- and what it writes after
    the reader left is dropped, as is the final flush at exit (stdout is
    pointed at /dev/null then, or Python would print "Exception ignored").
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._left()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._left()

    def _left(self) -> None:
        self.gone = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            return              # not a file (a test's capture): nothing to flush at exit
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class ProgressBar:
    """A one-line progress bar on a terminal; does nothing when not a terminal.

    Use as ``progress_cb`` of ``group.copy``.
    """

    def __init__(self, label: str, out: TextIO | None = None, width: int = 30):
        self.out = out if out is not None else sys.stderr
        self.label = label
        self.width = width
        self.active = self.out.isatty()
        self.t0 = time.monotonic()

    def __call__(self, p: dict) -> None:
        if not self.active:
            return
        done, total = p["done_bytes"], p["total_bytes"]
        frac = done / total if total else 0.0
        fill = int(frac * self.width)
        elapsed = time.monotonic() - self.t0
        speed = done / max(1e-6, elapsed)
        self.out.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}]"
                       f" {frac * 100:5.1f}%  {size(done)} / {size(total)}"
                       f"  {rate(speed)}  ETA {eta(done, total, elapsed)}\x1b[K")
        self.out.flush()

    def close(self) -> None:
        if self.active:
            self.out.write("\r\x1b[K")
            self.out.flush()


def watch(out: TextIO, draw, interval: float = 1.0, rounds: int | None = None) -> None:
    """Call ``draw()`` every ``interval`` seconds on ``out``, clearing the
    screen first, until Ctrl-C (which ends the watch: it is no error)."""
    n = 0
    try:
        while rounds is None or n < rounds:
            print(CLEAR, end="", file=out)
            print(time.strftime("%Y-%m-%d %H:%M:%S"), file=out)
            draw()
            out.flush()
            n += 1
            if rounds is None or n < rounds:
                time.sleep(interval)    # the redraw period itself, not a wait for a state
    except KeyboardInterrupt:
        pass
