"""The ``cgmirror`` command line.

    cgmirror [-s SESSION.toml] slave start [NAME...]
    cgmirror [-s SESSION.toml] slave stop [NAME...]
    cgmirror [-s SESSION.toml] copy [--full | --incremental] [--json]
    cgmirror [-s SESSION.toml] status [--json]
    cgmirror [-s SESSION.toml] history [--json] [--limit N]
    cgmirror [-s SESSION.toml] secondary start|stop [NAME...]
    cgmirror [-s SESSION.toml] mirror run|pause|resume|status [--json] [--watch]
    cgmirror [-s SESSION.toml] mirror rate RATE [--json]   (the drain's limit, at once)
    cgmirror [-s SESSION.toml] failover [--test | --end-test] [--json]
    cgmirror [-s SESSION.toml] failback [--full] [--keep-overwritten DIR] [--json]
    cgmirror [-s SESSION.toml] resync --from SITE --to SITE [--full]
                                      [--keep-overwritten DIR] [--json]
    cgmirror [-s SESSION.toml] switchover [--to SITE] [--json]
    cgmirror [-s SESSION.toml] slave|secondary run NAME   (foreground, for systemd)
    cgmirror [-s SESSION.toml] node run|exec NAME   (supervised, or exec for the unit)
    cgmirror [-s SESSION.toml] events [--once]      (JSON lines from the running mirror;
                                                    with [cluster] from etcd, --once: those kept)
    cgmirror [-s SESSION.toml] verify [--repair] [--json]   (online, via the mirror)
    cgmirror [-s SESSION.toml] check [--json]       (validate; starts nothing)
    cgmirror [-s SESSION.toml] install-units [--dir DIR] [--exec CMD]
    cgmirror --version
    cgmirror [-s SESSION.toml] pki init|issue ...   (see pki_cmds; no session needed)

The session file comes from ``-s/--session`` or ``$CGMIRROR_SESSION``.
``main(argv) -> int`` returns an ``errors.ExitCode``; tests call it in
process.  Every error is one line on stderr; with ``--json`` stdout carries
exactly one JSON document, also on error (``{"ok": false, "error": ...}``).
Each noun lives in its own module of this package (``slave_cmds``,
``copy_cmds``, ``status_cmds`` for status and history, ``mirror_cmds``,
``failover_cmds`` for failover, failback, resync and switchover, ...) whose
``register(subparsers)`` adds its parser and sets its handler; this module
only loops over ``NOUNS``.  ``python -m coordinator.cli`` runs ``main``
(``__main__.py``).

JSON documents (every one has "ok"; on error also "error", "error_type",
"fault" (local/slave/target/unreachable) and "exit_code"):

    copy --json     {"ok", "session", "n", "mode", "result" (ok/failed/aborted),
                     "started", "establish": {"n", "coordination_ms", "total_ms",
                     "max_held_ms", "slaves": {S: {"frozen_ms", "drain_ms",
                     "held_ms", "blocks": {V: int}}}} | null,
                     "copy": {"n", "mode", "ok", "bytes", "seconds", "slaves":
                     {S: {V: {"target", "mode", "bytes", "total_bytes", "seconds",
                     "state", "error", "mb_per_s"}}}} | null}
    status --json   {"ok", "session", "group", "slaves": {S: {"reachable", "error",
                     "pid", "phase", "n", "ended", "last_copy_ok", "volumes": {V: {
                     "present", "target", "synced", "target_holds" (as in
                     group.volumes), "dirty_bytes", "error",
                     + the slave's own volume status: "size", "granularity",
                     "dirty_blocks", "cr_blocks", "oos_blocks", "gate", "pit",
                     "copy", "synced_target", ...}}}}}
    history --json  {"ok", "session", "group", "copies": [{"n", "session", "started",
                     "finished", "mode", "result", "error", "coordination_ms",
                     "establish_ms", "max_held_ms", "bytes", "seconds",
                     "volumes": {S: {V: {"target", "mode", "bytes", "seconds",
                     "result", "error"}}}}, ...newest first],
                     "groups": [{"n", "session", "cut", "hardened", "outcome"
                     (running, hardened, drain-timeout, aborted, failed,
                     interrupted), "error", "bytes", "coordination_ms", "hold_ms",
                     "drain_ms", "prepare_ms", "commit_ms"}, ...newest first]}
    "group" (what the targets hold, from the history): {"consistent", "n",
                     "taken", "age_s", "volumes": {S: {V: {"state" (holds,
                     partial, copying, none), "n", "error"}}}, "last_copy":
                     {"n", "result", "started", "age_s", "error"} | null}

Any other exception is a bug: one line (``InternalError``, exit FAILED), or
its traceback with ``CGMIRROR_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from dataclasses import dataclass

from .. import errors, output, session as session_mod
from . import copy_cmds, pki_cmds, slave_cmds
from . import failover_cmds, mirror_cmds, status_cmds
from . import check_cmds, events_cmds, node_cmds, units_cmds, verify_cmds
from ..errors import CgmirrorError, ExitCode


DEBUG_ENV = "CGMIRROR_DEBUG"


@dataclass
class Context:
    """What a handler needs: the session, and how to talk to the user."""

    session: session_mod.Session | None     # None: a command that needs none, run without
    json: bool = False

    @property
    def out(self):
        return sys.stdout

    @property
    def err(self):
        return sys.stderr

    def say(self, text: str) -> None:
        """A line for people (suppressed with --json)."""
        if not self.json:
            print(text, file=self.out)

    def warn(self, text: str) -> None:
        print(f"cgmirror: warning: {text}", file=self.err)


# One module per noun, each with ``register(subparsers)`` that adds its parser
# and sets ``func`` (handler(ctx, args) -> ExitCode); the order here is the
# order of ``--help``.
NOUNS = (
    slave_cmds,        # slave and secondary
    node_cmds,
    copy_cmds,
    status_cmds,
    mirror_cmds,
    failover_cmds,
    events_cmds,
    verify_cmds,
    check_cmds,
    units_cmds,
    pki_cmds,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage
    first); subcommand parsers inherit this class."""

    def error(self, message: str):
        self.exit(int(ExitCode.USAGE),
                  f"cgmirror: {message} (see {self.prog} --help)\n")


def _session_option(parser: argparse.ArgumentParser) -> None:
    """``-s FILE`` on a parser and every parser below it, so that it may come
    before or after the noun (``cgmirror copy -s x.toml``).  SUPPRESS: a
    subcommand's default must not overwrite what the top level parsed."""
    parser.add_argument("-s", "--session", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"session TOML file (default: ${session_mod.ENV})")
    # argparse has no public way to list subparsers; walking them here keeps
    # ``register(subparsers)`` free of a parent parser every noun must pass.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _session_option(child)


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when
    run from a source tree that was never installed."""
    try:
        return importlib.metadata.version("cgmirror")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cgmirror",
                description="Consistent copies of volume groups served by cgmirror"
                            " slaves.")
    p.add_argument("--version", action="version", version=f"cgmirror {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in NOUNS:
        noun.register(sub)
    _session_option(p)
    return p


def _session(args) -> session_mod.Session | None:
    """The session a command runs in.  A command registered with
    ``needs_session=False`` (``pki``) runs without one, but uses the one
    given by ``-s`` or ``$CGMIRROR_SESSION`` for its defaults."""
    given = getattr(args, "session", None) or os.environ.get(session_mod.ENV)
    if not getattr(args, "needs_session", True) and not given:
        return None
    return session_mod.load(session_mod.locate(given))


def main(argv: list[str] | None = None) -> int:
    """Run one cgmirror command; return its exit code (an ExitCode)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # --help (0) or a usage error (2), already printed
        return int(exc.code or 0) and int(ExitCode.USAGE)
    want_json = getattr(args, "json", False)
    stdout, sys.stdout = sys.stdout, output.PipeSafe(sys.stdout)
    try:
        try:
            return int(args.func(Context(_session(args), want_json), args))
        except CgmirrorError:
            raise
        except Exception as exc:
            # A bug: still one line (and one JSON document), unless asked.
            if os.environ.get(DEBUG_ENV):
                raise
            raise errors.InternalError(f"{errors.describe(exc)}; this is a bug (set"
                                       f" {DEBUG_ENV}=1 for the traceback)") from exc
    except CgmirrorError as exc:
        print(f"cgmirror: {exc}", file=sys.stderr)
        if want_json:
            output.emit_json((getattr(exc, "details", None) or {}) | exc.to_json(),
                             sys.stdout)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print(f"cgmirror: {errors.INTERRUPTED}", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    finally:
        sys.stdout = stdout

