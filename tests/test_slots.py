"""wire.slots.SlotTable: which connection a full table gives up (pure, no sockets)."""

from __future__ import annotations

import pytest

from wire.slots import SlotTable


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0           # every call is a later instant
        return self.t


def table(n: int) -> SlotTable:
    return SlotTable(n, clock=Clock())


def test_below_capacity_nobody_goes():
    """Free slots: admitted, no victim."""
    t = table(2)
    assert t.admit("a") == (True, None)
    assert t.admit("b") == (True, None)
    assert len(t) == 2


def test_full_evicts_the_oldest_unauthenticated_first():
    """An authenticated idle connection outlives any unauthenticated one, old or new."""
    t = table(3)
    t.admit("coordinator")
    t.authenticated("coordinator")
    t.admit("scan1")
    t.admit("scan2")
    assert t.admit("scan3") == (True, "scan1")
    assert t.admit("scan4") == (True, "scan2")
    assert "coordinator" in t and "scan1" not in t


def test_never_asked_goes_before_one_that_asked():
    """Among authenticated ones: those that never sent a request go first,
    then the longest idle."""
    t = table(3)
    for k in ("old-user", "idle", "new-user"):
        t.admit(k, authenticated=True)
    t.busy("old-user")
    t.done("old-user")
    t.busy("new-user")
    t.done("new-user")
    assert t.victim() == "idle"
    t.release("idle")
    t.admit("x", authenticated=True)
    t.busy("x")
    t.done("x")
    assert t.victim() == "old-user"     # used longest ago


def test_busy_and_pinned_are_never_taken():
    """A connection inside a request or pinned stays; when all are, the new one is refused."""
    t = table(2)
    t.admit("asking", authenticated=True)
    t.admit("owner", authenticated=True)
    t.busy("asking")
    t.pin("owner")
    assert t.admit("new") == (False, None)
    assert len(t) == 2 and "new" not in t
    t.pin("owner", False)
    assert t.admit("new") == (True, "owner")


def test_release_of_an_evicted_key_says_so():
    """The evicted key is already forgotten: its own release returns False."""
    t = table(1)
    t.admit("a")
    assert t.admit("b") == (True, "a")
    assert t.release("a") is False
    assert t.release("b") is True and len(t) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        SlotTable(0)


def test_a_handshake_under_way_outlives_silent_connections():
    """Unauthenticated peers that said nothing go before one whose handshake
    is under way, however old."""
    t = table(3)
    t.admit("coordinator")
    t.heard("coordinator")
    t.admit("silent1")
    t.admit("silent2")
    assert t.admit("silent3") == (True, "silent1")
    assert t.admit("silent4") == (True, "silent2")
    assert "coordinator" in t
