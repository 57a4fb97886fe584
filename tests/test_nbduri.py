"""wire.nbduri: spellings of one image share an identity; different images don't."""

from __future__ import annotations

import pytest

from wire import nbduri


def ident(uri: str, base: str):
    return nbduri.parse(uri, base).identity


@pytest.mark.parametrize("other", [
    "nbd+unix:///db?socket=./x.sock",
    "nbd+unix://localhost/db?socket=x.sock",
    "nbds+unix:///db?socket=x.sock",                   # TLS: same image
    "nbd+unix:///db?socket=sub/../x.sock",
    "nbd+unix:///db?socket=link/x.sock",               # symlinked directory
    "nbd+unix:///db?socket=x.sock&tls-certificates=/c",
    "nbd+unix:///d%62?socket=x.sock",                   # percent-encoded export
])
def test_unix_spellings_of_one_image(tmp_path, other):
    """Relative, ./, .., localhost, symlinks, TLS and extra keys do not matter."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    base = str(tmp_path)
    assert ident(other, base) == ident("nbd+unix:///db?socket=x.sock", base)
    assert ident(other, base) == ident(f"nbd+unix:///db?socket={tmp_path}/x.sock", "/")


def test_symlinked_socket_is_the_socket(tmp_path):
    """A symlink to the socket file is the socket."""
    (tmp_path / "x.sock").touch()
    (tmp_path / "alias.sock").symlink_to(tmp_path / "x.sock")
    base = str(tmp_path)
    assert ident("nbd+unix:///db?socket=alias.sock", base) == \
        ident("nbd+unix:///db?socket=x.sock", base)


@pytest.mark.parametrize("a,b", [
    ("nbd+unix:///db?socket=x.sock", "nbd+unix:///log?socket=x.sock"),
    ("nbd+unix:///db?socket=x.sock", "nbd+unix:///db?socket=y.sock"),
    ("nbd+unix:///?socket=x.sock", "nbd+unix:///db?socket=x.sock"),   # default != db
    ("nbd://h/db", "nbd://h:10810/db"),
    ("nbd://h/db", "nbd://g/db"),
    ("nbd://localhost/db", "nbd://127.0.0.1/db"),                     # not resolved
    ("nbd+unix:///db?socket=/s", "nbd://localhost/db"),
])
def test_different_images(tmp_path, a, b):
    assert ident(a, str(tmp_path)) != ident(b, str(tmp_path))


def test_default_export_spellings(tmp_path):
    """No path and '/' are both the default export ''; '//' is the export '/'."""
    base = str(tmp_path)
    for uri in ("nbd+unix://?socket=s", "nbd+unix:///?socket=s"):
        assert nbduri.parse(uri, base).export == ""
    assert nbduri.parse("nbd+unix:////?socket=s", base).export == "/"
    assert "default export" in nbduri.parse("nbd://h", base).describe()


@pytest.mark.parametrize("other", ["nbd://H.example/db", "nbd://h.example:10809/db",
                                   "nbds://h.example./db"])
def test_tcp_spellings(other):
    """Host case, a trailing dot, TLS and the default port do not matter."""
    assert nbduri.parse(other).identity == nbduri.parse("nbd://h.example/db").identity
    assert str(nbduri.parse(other).endpoint) == "tcp:h.example:10809"


def test_ipv6():
    assert str(nbduri.parse("nbd://[::1]/x").endpoint) == "tcp:[::1]:10809"


@pytest.mark.parametrize("uri,words", [
    ("http://h/db", "not an NBD URI"),
    ("nbd+unix:///db", "needs exactly one ?socket=PATH"),
    ("nbd+unix:///db?socket=a&socket=b", "needs exactly one"),
    ("nbd://h:99999/db", "port"),
    ("nbd://h:x/db", "port"),
    ("nbd:///db", "no host"),
    ("nbd+vsock://x/db", "numeric CID"),
])
def test_bad_uris(uri, words):
    """Each bad URI is one line naming it."""
    with pytest.raises(ValueError) as ei:
        nbduri.parse(uri, "/")
    assert words in str(ei.value) and "\n" not in str(ei.value)


def test_own_addresses(tmp_path):
    """unix:PATH and tcp:HOST:PORT give the same endpoints as URIs."""
    base = str(tmp_path)
    assert nbduri.parse_address("unix:x.sock", base) == \
        nbduri.parse("nbd+unix:///?socket=x.sock", base).endpoint
    assert nbduri.parse_address("tcp:Host:10809") == nbduri.parse("nbd://host/").endpoint
    assert str(nbduri.parse_address("tcp:[::1]:7")) == "tcp:[::1]:7"
    for bad in ("tcp:host", "udp:h:1", "unix:", "tcp:h:0"):
        with pytest.raises(ValueError):
            nbduri.parse_address(bad, base)


def test_same_image(tmp_path, monkeypatch):
    """Without a base, relative sockets are relative to the current directory."""
    monkeypatch.chdir(tmp_path)
    assert nbduri.same_image("nbd+unix:///a?socket=s", "nbd+unix://localhost/a?socket=./s")
    assert not nbduri.same_image("nbd+unix:///a?socket=s", "nbd+unix:///b?socket=s")
