"""The ``cgmirror`` command line.

    cgmirror [-s SESSION.toml] slave start [NAME...]
    cgmirror [-s SESSION.toml] slave stop [NAME...]
    cgmirror [-s SESSION.toml] copy [--full | --incremental] [--json]
    cgmirror [-s SESSION.toml] status [--json]
    cgmirror [-s SESSION.toml] history [--json] [--limit N]

The session file comes from ``-s/--session`` or ``$CGMIRROR_SESSION``.
``main(argv) -> int`` returns an ``errors.ExitCode``; tests call it in
process.  Every error is one line on stderr; with ``--json`` stdout carries
exactly one JSON document, also on error (``{"ok": false, "error": ...}``).
Handlers live in one module per noun (``slave_cmds``, ``copy_cmds``,
``status_cmds``) and are a few lines each.

JSON documents (every one has "ok"; on error also "error", "error_type",
"fault" (local/slave/target/unreachable) and "exit_code"):

    copy --json     {"ok", "session", "n", "mode", "result" (ok/failed/aborted),
                     "started", "establish": {"n", "coordination_ms", "total_ms",
                     "max_held_ms", "slaves": {S: {"frozen_ms", "drain_ms",
                     "held_ms", "blocks": {V: int}}}} | null,
                     "copy": {"n", "mode", "ok", "bytes", "seconds", "slaves":
                     {S: {V: {"target", "mode", "bytes", "total_bytes", "seconds",
                     "state", "error", "mb_per_s"}}}} | null}
    status --json   {"ok", "session", "slaves": {S: {"reachable", "error", "pid",
                     "phase", "n", "ended", "last_copy_ok", "volumes": {V: {
                     "present", "target", "synced", "dirty_bytes", "error",
                     + the slave's own volume status: "size", "granularity",
                     "dirty_blocks", "cr_blocks", "oos_blocks", "gate", "pit",
                     "copy", "synced_target", ...}}}}}
    history --json  {"ok", "session", "copies": [{"n", "session", "started",
                     "finished", "mode", "result", "error", "coordination_ms",
                     "establish_ms", "max_held_ms", "bytes", "seconds",
                     "volumes": {S: {V: {"target", "mode", "bytes", "seconds",
                     "result", "error"}}}}, ...newest first]}
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from . import copy_cmds, output, session as session_mod, slave_cmds, status_cmds
from .errors import CgmirrorError, ExitCode, UsageError


@dataclass
class Context:
    """What a handler needs: the session, and how to talk to the user."""

    session: session_mod.Session
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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--session", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"session TOML file (default: ${session_mod.ENV})")
    p = argparse.ArgumentParser(prog="cgmirror", parents=[common],
                                description="Consistent copies of volume groups"
                                            " served by cgmirror slaves.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    slave = sub.add_parser("slave", parents=[common], help="start or stop slaves")
    ssub = slave.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("start", "start slaves (all if none named), detached"),
                         ("stop", "stop slaves (all if none named)")):
        a = ssub.add_parser(action, parents=[common], help=text)
        a.add_argument("names", nargs="*", metavar="NAME")

    c = sub.add_parser("copy", parents=[common],
                       help="establish a consistent point in time and copy it")
    m = c.add_mutually_exclusive_group()
    m.add_argument("--full", dest="mode", action="store_const", const="full",
                   help="copy every block")
    m.add_argument("--incremental", dest="mode", action="store_const",
                   const="incremental", help="copy only what changed since the"
                                             " last copy to the same target")
    c.set_defaults(mode="auto")
    c.add_argument("--json", action="store_true", help="one JSON document on stdout")

    s = sub.add_parser("status", parents=[common], help="slaves, volumes, copies")
    s.add_argument("--json", action="store_true", help="one JSON document on stdout")

    h = sub.add_parser("history", parents=[common], help="past copies, newest first")
    h.add_argument("--json", action="store_true", help="one JSON document on stdout")
    h.add_argument("--limit", type=int, default=None, metavar="N")
    return p


def _dispatch(ctx: Context, args: argparse.Namespace) -> ExitCode:
    if args.command == "slave":
        fn = slave_cmds.start if args.action == "start" else slave_cmds.stop
        return fn(ctx, args.names)
    if args.command == "copy":
        return copy_cmds.copy(ctx, args.mode)
    if args.command == "status":
        return status_cmds.status(ctx)
    if args.command == "history":
        return status_cmds.history(ctx, args.limit)
    raise UsageError(f"unknown command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    """Run one cgmirror command; return its exit code (an ExitCode)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # --help (0) or a usage error (2), already printed
        return int(exc.code or 0) and int(ExitCode.USAGE)
    want_json = getattr(args, "json", False)
    try:
        sess = session_mod.load(session_mod.locate(getattr(args, "session", None)))
        return int(_dispatch(Context(sess, want_json), args))
    except CgmirrorError as exc:
        print(f"cgmirror: {exc}", file=sys.stderr)
        if want_json:
            output.emit_json((getattr(exc, "details", None) or {}) | exc.to_json(),
                             sys.stdout)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("cgmirror: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
