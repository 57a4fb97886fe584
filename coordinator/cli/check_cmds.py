"""``cgmirror check [--json]``: validate a session file without running it.

Loading the session already refuses every malformed key in one line (exit
CONFIG, see session.py).  ``check`` then looks at what only this machine can
say, without starting or contacting any process: nbdkit and the plugin are
found, each image exists or has a ``size`` to be created with, each image's
directory and each state directory can be made, TLS certificate directories
exist where a TCP path needs them.  It prints what it checked, one line per
item, and exits CONFIG at the first problem (``--json``: the list).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil

from wire import address

from .. import output
from ..errors import ConfigError, ExitCode
from ..launch import PLUGIN


def register(sub) -> None:
    """``cgmirror check``."""
    a = sub.add_parser("check", help="validate the session file (starts nothing)")
    a.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a.set_defaults(func=lambda ctx, args: check(ctx))


def _creatable(path: str) -> bool:
    """``path`` exists, or its nearest existing parent lets us create it."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return os.access(p, os.W_OK | os.X_OK) if os.path.isdir(p) else os.access(p, os.W_OK)


def issue_command(cfg) -> str:
    """The ``cgmirror pki issue`` that makes node ``cfg``'s certificate
    directory: in the directory the session reads it from, naming every
    TCP host the node is dialled by (without them the certificate is
    refused at the first connection)."""
    names = []
    for text in (cfg.control, cfg.nbd):
        if text:
            a = address.parse(text)
            if a.is_tcp:
                try:
                    ipaddress.ip_address(a.host)
                    flag = f"--ip {a.host}"
                except ValueError:
                    flag = f"--dns {a.host}"
                if flag not in names:
                    names.append(flag)
    return " ".join(["cgmirror pki issue", shlex.quote(os.path.basename(cfg.tls)), "--dir",
                     shlex.quote(os.path.dirname(cfg.tls)), *names])


def problems(session) -> tuple[list[str], list[str]]:
    """(what was checked, what is wrong), each a list of lines."""
    done, bad = [], []

    def item(ok: bool, what: str, wrong: str) -> None:
        done.append(what)
        if not ok:
            bad.append(wrong)

    item(shutil.which("nbdkit") is not None, "nbdkit is on PATH",
         "nbdkit is not on PATH (install the nbdkit package)")
    item(os.path.exists(PLUGIN), f"the plugin {PLUGIN} exists",
         f"the plugin {PLUGIN} is missing (a broken installation)")
    peers = [(c.name, c.state_dir, c.tls,
              [(v.name, v.path, v.size) for v in c.volumes], c)
             for c in session.slaves + session.secondaries]
    for name, state_dir, tls_dir, volumes, cfg in peers:
        item(_creatable(state_dir), f"{name}: state directory {state_dir} can be used",
             f"{name}: state directory {state_dir} cannot be created (permissions)")
        if tls_dir:
            item(os.path.isdir(tls_dir), f"{name}: TLS directory {tls_dir} exists",
                 f"{name}: TLS directory {tls_dir} is missing: run `{issue_command(cfg)}`")
        for vol, path, size in volumes:
            if os.path.exists(path):
                item(os.access(path, os.R_OK | os.W_OK),
                     f"{name}/{vol}: image {path} is readable and writable",
                     f"{name}/{vol}: image {path} is not readable and writable")
            else:
                item(size is not None and _creatable(path),
                     f"{name}/{vol}: image {path} will be created"
                     f" ({output.size(size)})" if size else f"{name}/{vol}: image {path}",
                     f"{name}/{vol}: image {path} does not exist" +
                     (" and cannot be created" if size else " and has no size to"
                      " create it with"))
    mine = sorted({c.client_tls for c in session.slaves + session.secondaries
                   if c.client_tls})
    for d in mine:                  # the coordinator's own, for TCP control channels
        item(os.path.isdir(d), f"coordinator: TLS directory {d} exists",
             f"coordinator: TLS directory {d} is missing: run `cgmirror pki issue"
             f" {shlex.quote(os.path.basename(d))} --dir {shlex.quote(os.path.dirname(d))}`")
    m = session.mirror
    if m:
        done.append(f"mirror: {len(session.pairs())} volume pairs, control {m.control},"
                    f" metrics {'%s:%d' % m.metrics if m.metrics else 'off'},"
                    f" rate {output.size(m.rate) + '/s' if m.rate else 'unlimited'}")
    return done, bad


def check(ctx) -> ExitCode:
    s = ctx.session
    done, bad = problems(s)
    doc = {"ok": not bad, "session": s.name, "path": s.path, "checked": done,
           "problems": bad}
    ctx.say(f"session {s.name} ({s.path}): the file is valid")
    for line in done:
        ctx.say(f"  checked: {line}")
    if bad:
        for line in bad[1:]:
            print(f"cgmirror: {line}", file=ctx.err)
        exc = ConfigError(bad[0] + (f" (and {len(bad) - 1} more above)"
                                    if len(bad) > 1 else ""))
        exc.details = doc           # main() emits it as the one JSON document
        raise exc
    if ctx.json:
        output.emit_json(doc, ctx.out)
    ctx.say(f"session {s.name}: {len(done)} checks passed; nothing was started")
    return ExitCode.OK
