"""History of copies, in ``<state_dir>/history.sqlite`` (stdlib sqlite3).

One row per cut number the coordinator used (so a number is never reused),
written when the cut starts ("running") and completed when it ends ("ok",
"failed", "aborted").  A row left "running" by a coordinator that died
becomes "interrupted" the next time a coordinator takes the session.
Per-volume results are in ``copy_volumes``.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import time

from .errors import LocalError

DB_NAME = "history.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS copies (
    n               INTEGER PRIMARY KEY,
    session         TEXT NOT NULL,
    started         REAL NOT NULL,      -- unix time
    finished        REAL,
    mode            TEXT NOT NULL,      -- asked: auto, full, incremental
    result          TEXT NOT NULL,      -- running, ok, failed, aborted, interrupted
    error           TEXT,
    coordination_ms REAL,               -- freeze sent -> all frozen
    establish_ms    REAL,               -- freeze sent -> all thawed
    max_held_ms     REAL,               -- longest a slave held its gates
    bytes           INTEGER,
    seconds         REAL
);
CREATE TABLE IF NOT EXISTS copy_volumes (
    n        INTEGER NOT NULL REFERENCES copies(n),
    slave    TEXT NOT NULL,
    volume   TEXT NOT NULL,
    target   TEXT NOT NULL,
    mode     TEXT NOT NULL,             -- done: full or incremental
    bytes    INTEGER NOT NULL,
    seconds  REAL NOT NULL,
    result   TEXT NOT NULL,
    error    TEXT,
    PRIMARY KEY (n, slave, volume)
);
"""


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class History:
    """The copy history of one session; every sqlite3 error becomes LocalError."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, DB_NAME)
        try:
            os.makedirs(state_dir, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LocalError(f"history {self.path}: {exc}") from exc

    def _run(self, sql: str, args=()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise LocalError(f"history {self.path}: {exc}") from exc

    def max_n(self) -> int:
        return self._run("SELECT COALESCE(MAX(n), 0) FROM copies")[0][0]

    def mark_interrupted(self) -> int:
        """Rows left 'running' by a coordinator that died; call with the lock held."""
        return len(self._run("UPDATE copies SET result='interrupted', error="
                             "'the coordinator stopped before the end' "
                             "WHERE result='running' RETURNING n"))

    def begin(self, n: int, session: str, mode: str) -> None:
        self._run("INSERT INTO copies (n, session, started, mode, result)"
                  " VALUES (?, ?, ?, ?, 'running')", (n, session, time.time(), mode))

    def finish(self, n: int, result: str, error: str | None = None,
               established=None, report: dict | None = None) -> None:
        """Complete row n.  ``established``: group.Established or None;
        ``report``: a CopyReport.to_json() (possibly partial) or None."""
        est = established
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(
                    "UPDATE copies SET finished=?, result=?, error=?, coordination_ms=?,"
                    " establish_ms=?, max_held_ms=?, bytes=?, seconds=? WHERE n=?",
                    (time.time(), result, error,
                     est.coordination_ms if est else None,
                     est.total_ms if est else None,
                     est.max_held_ms if est else None,
                     report["bytes"] if report else None,
                     report["seconds"] if report else None, n))
                for slave, vols in (report or {}).get("slaves", {}).items():
                    for vol, c in vols.items():
                        self.db.execute(
                            "INSERT OR REPLACE INTO copy_volumes VALUES"
                            " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (n, slave, vol, c["target"], c["mode"], c["bytes"],
                             c["seconds"], c["state"], c["error"]))
        except sqlite3.Error as exc:
            raise LocalError(f"history {self.path}: {exc}") from exc

    def copies(self, limit: int | None = None) -> list[dict]:
        """Newest first; each with its volumes as {slave: {volume: {...}}}."""
        rows = self._run("SELECT * FROM copies ORDER BY n DESC"
                         + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
        out = []
        for r in rows:
            d = dict(r)
            d["started"], d["finished"] = _iso(d["started"]), _iso(d["finished"])
            vols: dict[str, dict] = {}
            for v in self._run("SELECT * FROM copy_volumes WHERE n=? ORDER BY slave,"
                               " volume", (r["n"],)):
                vols.setdefault(v["slave"], {})[v["volume"]] = {
                    k: v[k] for k in ("target", "mode", "bytes", "seconds", "result",
                                      "error")}
            d["volumes"] = vols
            out.append(d)
        return out

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
