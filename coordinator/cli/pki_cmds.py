"""``cgmirror pki``: the session CA and the hosts' certificates.

    cgmirror pki init  [--dir DIR] [--name SESSION] [--json]
    cgmirror pki issue NAME [--dir DIR] [--dns NAME]... [--ip ADDR]... [--days N] [--json]

Both work without a session file.  With one, DIR defaults to the session's
``state_dir/pki`` and SESSION to the session's name; without one, both must be
given.  ``issue`` writes ``DIR/NAME/``, to be copied to host NAME (see
docs/TLS.md for which names each host's certificate must carry).
"""

from __future__ import annotations

import argparse
import os

from .. import output, pki
from ..errors import ExitCode, UsageError


def register(sub) -> None:
    """Add the ``pki`` command and its ``init``/``issue`` actions to ``sub``."""
    p = sub.add_parser("pki", help="session CA and host certificates (TLS)")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", metavar="DIR", default=None,
                        help="PKI directory (default: the session's state_dir/pki)")
    common.add_argument("--json", action="store_true", help="one JSON document on stdout")

    i = psub.add_parser("init", parents=[common], help="make the session CA")
    i.add_argument("--name", metavar="SESSION", default=None,
                   help="session name carried by the CA (default: the session's)")
    i.set_defaults(func=init, needs_session=False)

    s = psub.add_parser("issue", parents=[common],
                        help="make a host's key and certificate, signed by the CA")
    s.add_argument("name", metavar="NAME", help="host name (common name, directory)")
    s.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="a DNS name clients dial this host by (repeatable)")
    s.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="an IP address clients dial this host by (repeatable)")
    s.add_argument("--days", type=int, default=pki.HOST_DAYS, metavar="N",
                   help=f"validity in days (default {pki.HOST_DAYS})")
    s.set_defaults(func=issue, needs_session=False)


def init(ctx, args) -> ExitCode:
    """``pki init``: make the CA."""
    name = args.name or (ctx.session.name if ctx.session else None)
    if name is None:
        raise UsageError("pki init: --name SESSION is needed without a session file")
    d = _dir(ctx, args)
    ca = pki.init(d, name)
    _report(ctx, {"ok": True, "dir": d, "session": name, "ca_cert": ca},
            f"session {name}: CA in {d} (keep {os.path.join(d, pki.CA_KEY)} here;"
            f" issue host certificates with: cgmirror pki issue NAME --dir {d})")
    return ExitCode.OK


def issue(ctx, args) -> ExitCode:
    """``pki issue NAME``: make one host's key and certificate."""
    d = _dir(ctx, args)
    host = pki.issue(d, args.name, dns=args.dns, ips=args.ip, days=args.days)
    _report(ctx, {"ok": True, "dir": d, "name": args.name, "host_dir": host,
                  "dns": args.dns, "ip": args.ip, "days": args.days},
            f"{args.name}: key and certificate in {host} (copy that directory to"
            f" host {args.name}, mode 0700)")
    return ExitCode.OK


def _dir(ctx, args) -> str:
    if args.dir:
        return args.dir
    if ctx.session is None:
        raise UsageError("pki: --dir DIR is needed without a session file")
    return os.path.join(ctx.session.state_dir, "pki")


def _report(ctx, doc: dict, line: str) -> None:
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        ctx.say(line)
