"""History of copies, in ``<state_dir>/history.sqlite`` (stdlib sqlite3).

One row per cut number the coordinator used (so a number is never reused),
written when the cut starts ("running") and completed when it ends ("ok",
"failed", "aborted").  A row left "running" by a coordinator that died
becomes "interrupted" the next time a coordinator takes the session.
Per-volume results are in ``copy_volumes``.

The mirror (coordinator/mirror/cycle.py) writes a row per consistency group into
``groups`` instead: begun at the cut ("running"), finished as "hardened",
"drain-timeout", "aborted" or "failed" (with the reason).  Cut numbers are
one sequence for both tables (``max_n``), so a copy and a group never share
a number.

Numbers come from slaves, over a wire; a slave may report anything (a cut
number of 2^63+5 once made every later ``cgmirror copy`` die of SQLite's
OverflowError).  So the boundary is here, both ways:

* writing: a cut number outside 1..2^63-1 is refused with one line before
  anything is written; a measurement (bytes, seconds, milliseconds) that is
  not a finite number in range is stored as NULL ("-" for people), because a
  copy that went well must not be failed by its statistics;
* reading: a row stored by an older version (or edited by hand) with a value
  of the wrong type or out of range reads as None, so ``history`` and
  ``status`` stay readable; nothing on the way out can be NaN or infinite.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import time

from wire import files, nbduri

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
CREATE TABLE IF NOT EXISTS groups (
    n               INTEGER PRIMARY KEY,
    session         TEXT NOT NULL,
    cut             REAL NOT NULL,      -- unix time of the freeze
    hardened        REAL,               -- unix time every secondary committed
    outcome         TEXT NOT NULL,      -- running, hardened, drain-timeout, aborted,
                                        -- failed, interrupted
    error           TEXT,
    bytes           INTEGER,            -- confirmed at the secondaries
    coordination_ms REAL,               -- freeze sent -> all frozen
    hold_ms         REAL,               -- longest a slave held its gates
    drain_ms        REAL,
    prepare_ms      REAL,
    commit_ms       REAL
);
-- group(): the newest copy of each volume, without scanning the history.
CREATE INDEX IF NOT EXISTS copy_volumes_newest ON copy_volumes (slave, volume, n);
"""


# SQLite's INTEGER is a signed 64-bit integer.
MAX_N = 2**63 - 1
# No copy moves more than an exabyte or lasts longer than a century: beyond
# that a number is a slave's nonsense, not a measurement.
_MAX_MEASURE = 1e18


def check_n(n: object) -> int:
    """A cut number that fits the history, else LocalError (one line)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise LocalError(f"cut number {n!r} is out of range for the history"
                         f" (1 to {MAX_N})")
    return n


def measure(v: object) -> int | float | None:
    """A byte count or a duration if it is a finite number in 0..1e18, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if not 0 <= v <= _MAX_MEASURE:      # also False for NaN
        return None
    return v


def _text(v: object) -> str | None:
    return None if v is None else str(v)


def _iso(t: object) -> str | None:
    """Unix time for people and JSON; None if missing or not a time."""
    t = measure(t)
    if t is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def _age(t: float | None, now: float) -> float | None:
    return None if t is None else round(max(0.0, now - t), 3)


class History:
    """The copy history of one session; every sqlite3 error becomes LocalError."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, DB_NAME)
        try:
            files.make_dirs(state_dir, files.READABLE_DIR)
            # sqlite would create it 0666 less the umask; its journal
            # files take the database's mode.
            os.close(files.open_private(self.path, mode=files.READABLE_FILE))
            # check_same_thread off: the mirror opens its history in the
            # thread that takes the session and forms groups in another; one
            # thread at a time uses it.
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                      check_same_thread=False)
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
        return self._run("SELECT MAX(COALESCE((SELECT MAX(n) FROM copies), 0),"
                         " COALESCE((SELECT MAX(n) FROM groups), 0))")[0][0]

    # ------------------------------------------------------------ mirror groups

    GROUP_MEASURES = ("bytes", "coordination_ms", "hold_ms", "drain_ms", "prepare_ms",
                      "commit_ms")

    def begin_group(self, n: int, session: str, cut: float) -> None:
        """Group n is being cut (a row "running" until ``finish_group``)."""
        self._run("INSERT INTO groups (n, session, cut, outcome) VALUES (?, ?, ?,"
                  " 'running')", (check_n(n), session, cut))

    def finish_group(self, n: int, outcome: str, error: str | None = None,
                     hardened: float | None = None, **measures) -> None:
        """Complete group n's row; ``measures``: any of GROUP_MEASURES (a value
        that is not a finite number in range is stored as NULL)."""
        unknown = set(measures) - set(self.GROUP_MEASURES)
        if unknown:
            raise ValueError(f"unknown group measures {sorted(unknown)}")
        cols = ", ".join(f"{k}=?" for k in measures)
        self._run(f"UPDATE groups SET outcome=?, error=?, hardened=?"
                  f"{', ' + cols if cols else ''} WHERE n=?",
                  (outcome, error, hardened, *(measure(v) for v in measures.values()),
                   check_n(n)))

    def mark_groups_interrupted(self) -> int:
        """Group rows left "running" by a mirror that died; call with the lock."""
        return len(self._run("UPDATE groups SET outcome='interrupted', error="
                             "'the coordinator stopped before the end' "
                             "WHERE outcome='running' RETURNING n"))

    def groups(self, limit: int | None = None) -> list[dict]:
        """Mirror groups, newest first."""
        rows = self._run("SELECT * FROM groups ORDER BY n DESC"
                         + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
        return [{"n": r["n"], "session": _text(r["session"]), "cut": _iso(r["cut"]),
                 "hardened": _iso(r["hardened"]), "outcome": _text(r["outcome"]),
                 "error": _text(r["error"])}
                | {k: measure(r[k]) for k in self.GROUP_MEASURES} for r in rows]

    def group_cut_time(self, n: int) -> float | None:
        """Unix time group n was cut, if the history has it."""
        rows = self._run("SELECT cut FROM groups WHERE n=?", (n,))
        return measure(rows[0]["cut"]) if rows else None

    def mark_interrupted(self) -> int:
        """Rows left 'running' by a coordinator that died; call with the lock held."""
        self._run("UPDATE copy_volumes SET result='interrupted', error="
                  "'the coordinator stopped before the end' WHERE result='running'")
        return len(self._run("UPDATE copies SET result='interrupted', error="
                             "'the coordinator stopped before the end' "
                             "WHERE result='running' RETURNING n"))

    def start_volumes(self, n: int, targets: dict[str, dict[str, str]],
                      full: dict[str, list[str]]) -> None:
        """Cut n is established: from now on each target may hold part of it.

        Written before the copy starts so that a coordinator killed mid-copy
        leaves rows saying which targets it was overwriting ("running", made
        "interrupted" by the next coordinator): the group is never reported
        consistent over a half-written target."""
        try:
            with self.db:
                self.db.execute("BEGIN")
                for slave, vols in targets.items():
                    for vol, uri in vols.items():
                        mode = "full" if vol in full.get(slave, ()) else "incremental"
                        self.db.execute(
                            "INSERT OR REPLACE INTO copy_volumes VALUES"
                            " (?, ?, ?, ?, ?, 0, 0, 'running', NULL)",
                            (n, slave, vol, uri, mode))
        except sqlite3.Error as exc:
            raise LocalError(f"history {self.path}: {exc}") from exc

    def begin(self, n: int, session: str, mode: str) -> None:
        try:
            check_n(n)
        except LocalError as exc:
            # The largest n comes from this file (max_n) or a slave (checked
            # before, naming it): the way out is a new history.
            raise LocalError(f"history {self.path}: {exc}; move the file aside to"
                             f" start a new history") from None
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
                     measure(est.coordination_ms) if est else None,
                     measure(est.total_ms) if est else None,
                     measure(est.max_held_ms) if est else None,
                     measure(report["bytes"]) if report else None,
                     measure(report["seconds"]) if report else None, check_n(n)))
                for slave, vols in (report or {}).get("slaves", {}).items():
                    for vol, c in vols.items():
                        self.db.execute(
                            "INSERT OR REPLACE INTO copy_volumes VALUES"
                            " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (n, slave, vol, c["target"], _text(c["mode"]),
                             measure(c["bytes"]) or 0, measure(c["seconds"]) or 0.0,
                             _text(c["state"]), _text(c["error"])))
                # Volumes the (partial) report does not cover ended with the copy.
                self.db.execute("UPDATE copy_volumes SET result=?, error=? WHERE n=?"
                                " AND result='running'",
                                ("failed" if result == "ok" else result, error, n))
        except sqlite3.Error as exc:
            raise LocalError(f"history {self.path}: {exc}") from exc

    def copies(self, limit: int | None = None) -> list[dict]:
        """Newest first; each with its volumes as {slave: {volume: {...}}}."""
        rows = self._run("SELECT * FROM copies ORDER BY n DESC"
                         + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
        out = []
        for r in rows:
            d = {k: _text(r[k]) for k in ("session", "mode", "result", "error")}
            d = {"n": r["n"]} | d | {"started": _iso(r["started"]),
                                     "finished": _iso(r["finished"])}
            d |= {k: measure(r[k]) for k in ("coordination_ms", "establish_ms",
                                              "max_held_ms", "bytes", "seconds")}
            vols: dict[str, dict] = {}
            for v in self._run("SELECT * FROM copy_volumes WHERE n=? ORDER BY slave,"
                               " volume", (r["n"],)):
                vols.setdefault(str(v["slave"]), {})[str(v["volume"])] = {
                    "target": _text(v["target"]), "mode": _text(v["mode"]),
                    "bytes": measure(v["bytes"]), "seconds": measure(v["seconds"]),
                    "result": _text(v["result"]), "error": _text(v["error"])}
            d["volumes"] = vols
            out.append(d)
        return out

    def group(self, targets: dict[str, dict[str, str]], now: float | None = None,
              copying: bool = True) -> dict:
        """What the session's targets hold, from the history alone.

        ``targets``: {slave: {volume: URI}} as the session names them now.
        For each volume, the newest copy to the same image (``wire.nbduri``)
        decides: "holds" cut n if it completed, "partial" if it failed or was
        interrupted (the target may hold part of cut n over an older cut),
        "copying" while it runs, "none" if nothing was ever copied there.
        The group is consistent only if every volume holds the same cut.
        ``copying``: whether a coordinator holds the session now; if not, a
        row still "running" was left by one that died and counts as partial.

        Returns {"consistent", "n", "taken", "age_s", "volumes": {slave:
        {volume: {"state", "n", "error"}}}, "last_copy": {"n", "result",
        "started", "age_s", "error"} | None}.
        """
        now = time.time() if now is None else now
        vols: dict[str, dict[str, dict]] = {}
        started: dict[int, float | None] = {}
        for slave, tv in targets.items():
            for vol, uri in tv.items():
                try:
                    # Usually the newest row is this target: read lazily.
                    rows = self.db.execute(
                        "SELECT v.n, v.target, v.result, v.error, c.started"
                        " FROM copy_volumes v JOIN copies c ON c.n = v.n"
                        " WHERE v.slave=? AND v.volume=? ORDER BY v.n DESC", (slave, vol))
                    row = next((r for r in rows
                                if nbduri.same_image(str(r["target"]), uri)), None)
                except sqlite3.Error as exc:
                    raise LocalError(f"history {self.path}: {exc}") from exc
                if row is None:
                    state = {"state": "none", "n": None, "error": None}
                else:
                    started[row["n"]] = measure(row["started"])
                    result = row["result"]
                    error = _text(row["error"])
                    if result == "running" and not copying:
                        result, error = "interrupted", "the coordinator stopped before the end"
                    state = {"state": {"done": "holds", "running": "copying"}.get(
                                 result, "partial"), "n": row["n"], "error": error}
                vols.setdefault(slave, {})[vol] = state
        states = [v for sv in vols.values() for v in sv.values()]
        cuts = {v["n"] for v in states}
        consistent = bool(states) and all(v["state"] == "holds" for v in states) \
            and len(cuts) == 1
        n = cuts.pop() if consistent else None
        taken = started.get(n) if consistent else None
        last = self._run("SELECT n, result, started, error FROM copies"
                         " ORDER BY n DESC LIMIT 1")
        last_copy = None
        if last:
            t = measure(last[0]["started"])
            last_copy = {"n": last[0]["n"], "result": _text(last[0]["result"]),
                         "started": _iso(t), "age_s": _age(t, now),
                         "error": _text(last[0]["error"])}
        return {"consistent": consistent, "n": n, "taken": _iso(taken),
                "age_s": _age(taken, now), "volumes": vols, "last_copy": last_copy}

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
