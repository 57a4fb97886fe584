"""Item 1 through the CLI: two volumes whose targets are one image never copy."""

from __future__ import annotations

import os

import pytest

import cgtest
from cgtest import MiB, need, read_all, run, write
from harness import peers
from coordinator.errors import ExitCode


@pytest.fixture(autouse=True)
def _need():
    need("nbdkit")


def test_two_volumes_on_one_target_image_refused(run_dir, capsys):
    """s2/data's target is s1/db's, spelled differently: copy refuses with one
    line naming both and writes nothing (main copied both, said done and
    SYNCED yes, and the target held whichever volume landed last)."""
    layout = {"s1": {"db": 2 * MiB}, "s2": {"data": 2 * MiB}}
    p = cgtest.write_session(run_dir, layout)
    sock = os.path.join(run_dir, "remote", "s1-db.sock")
    image = peers.make_image(os.path.join(run_dir, "remote", "s1-db.img"), 2 * MiB)
    target = peers.nbdkit_file(image, sock)
    try:
        with cgtest.slaves(p) as sess:
            for s in sess.slaves:
                write(s.spec().uri(s.volumes[0].name), 0, os.urandom(MiB))
            text = p.read_text()
            p.write_text(text.replace("nbd+unix:///data?socket=remote/s2-data.sock",
                                      "nbd+unix://localhost/db?socket=./remote/s1-db.sock"))
            try:
                assert run(p, "copy", "--full") == ExitCode.CONFIG
                err = capsys.readouterr().err
                assert err.count("\n") == 1, err
                assert (f"s2/data, key 'target': export 'db' on unix:{sock} is also the"
                        f" target of s1/db") in err
                assert read_all(target.uri) == bytes(2 * MiB)     # nothing was written
            finally:
                p.write_text(text)      # for slave stop
    finally:
        target.stop()
