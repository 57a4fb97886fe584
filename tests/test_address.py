"""wire.address: every accepted spelling, and one clear line for each bad one."""

import pytest

from wire.address import Address, AddressError, parse


@pytest.mark.parametrize("text, want", [
    ("unix:/run/s1.ctl", Address("unix", path="/run/s1.ctl")),
    ("unix:rel/s1.ctl", Address("unix", path="rel/s1.ctl")),
    ("/run/s1.ctl", Address("unix", path="/run/s1.ctl")),
    ("s1.ctl", Address("unix", path="s1.ctl")),
    ("./a:b.ctl", Address("unix", path="./a:b.ctl")),
    ("unix:a:b.ctl", Address("unix", path="a:b.ctl")),
    ("tcp:127.0.0.1:7000", Address("tcp", host="127.0.0.1", port=7000)),
    ("tcp:[::1]:7000", Address("tcp", host="::1", port=7000)),
    ("tcp:[fe80:0::1]:1", Address("tcp", host="fe80::1", port=1)),
    ("tcp:slave-a.example.org:65535", Address("tcp", host="slave-a.example.org", port=65535)),
    ("TCP:localhost:7000", Address("tcp", host="localhost", port=7000)),
])
def test_good_addresses_parse(text, want):
    """Each accepted spelling gives the expected address."""
    assert parse(text) == want


@pytest.mark.parametrize("text", ["unix:/run/s1.ctl", "tcp:127.0.0.1:7000",
                                  "tcp:[::1]:7000", "tcp:host.example:9"])
def test_str_round_trips(text):
    """str() of a parsed address parses back to the same address."""
    assert parse(str(parse(text))) == parse(text)


@pytest.mark.parametrize("text, says", [
    ("", "empty address"),
    ("   ", "empty address"),
    ("unix:", "names no path"),
    ("localhost:7000", "unknown scheme 'localhost'"),
    ("http://x", "unknown scheme 'http'"),
    ("tcp:7000", "expected tcp:HOST:PORT"),
    ("tcp::7000", "expected tcp:HOST:PORT"),
    ("tcp:::1:7000", "in brackets"),
    ("tcp:[zz::1]:7000", "not an IPv6 address"),
    ("tcp:300.1.1.1:7000", "not an IPv4 address or host name"),
    ("tcp:bad_name:7000", "not an IPv4 address or host name"),
    ("tcp:-x.org:7000", "not an IPv4 address or host name"),
    ("tcp:host:", "port must be"),
    ("tcp:host:http", "port must be"),
    ("tcp:host:65536", "port must be"),
    ("tcp:host:0", "port must be a number from 1"),
    ("a b.ctl", "space or control character"),
    ("unix:/x\0y", "space or control character"),
    ("unix:/" + "x" * 120, "longer than 107 bytes"),
])
def test_bad_addresses_are_refused_in_one_line(text, says):
    """Each bad address is refused with one line that says what is wrong."""
    with pytest.raises(AddressError) as exc:
        parse(text)
    msg = str(exc.value)
    assert says in msg and "\n" not in msg


def test_port_zero_only_where_listening():
    """Port 0 (any free port) is for listening only."""
    assert parse("tcp:127.0.0.1:0", listen=True).port == 0
    with pytest.raises(AddressError):
        parse("tcp:127.0.0.1:0")
