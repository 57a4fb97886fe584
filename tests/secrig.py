"""A real secondary node for the tests of the secondary role
(test_secondary.py, test_packed.py): started through the ``slaves``
fixture, its replication export's name, its image read back, a group
hardened over its control socket."""

SIZE = 2 << 20


def secondary(slaves, name="r1", env=None, volumes=(("a", SIZE),)):
    return slaves(name, volumes=volumes, role="secondary", env=env or {})


def export(proc, vol="a"):
    with proc.control() as c:
        return c.call("status")["volumes"][vol]["export"]


def img(proc, vol="a"):
    with open(dict((n, p) for n, p, _ in proc.spec.volumes)[vol], "rb") as f:
        return f.read()


def harden(c, n):
    assert c.call("prepare", n=n) == {"ok": True, "n": n}
    assert c.call("commit", n=n) == {"ok": True, "n": n}
