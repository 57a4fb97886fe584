"""Lineage events and the compare (wire/lineage.py), without nodes: every
rule of the table, and the histories of the failover stories of issue 18."""

import pytest

from wire import lineage, protocol
from wire.lineage import compare

G, H, K, X = "1" * 16, "2" * 16, "3" * 16, "4" * 16


def lin(current=G, history=(), hardened=0, cut=0, own=False):
    return {"current": current, "history": [list(h) for h in history],
            "hardened": hardened, "cut": cut, "own": own}


def st(current=G, history=(), *, dirty=False, **kw):
    return {"lineage": lin(current, history, **kw), "dirty": dirty}


# ---------------------------------------------------------------- events

def test_fresh_is_a_random_generation_with_nothing_held():
    """Event 1: a new random generation, no history, nothing hardened."""
    a, b = lineage.fresh(), lineage.fresh()
    assert a["current"] != b["current"]
    assert protocol.GENERATION.fullmatch(a["current"])
    assert (a["history"], a["hardened"], a["cut"], a["own"]) == ([], 0, 0, False)
    protocol.LINEAGE.check(a, "lineage")


def test_promote_pushes_current_at_its_hardened_group():
    """Event 2: history gets [current, hardened]; current is new; cuts restart."""
    before = lin(G, [(X, 3)], hardened=12, cut=5)
    after = lineage.promote(before)
    assert after["history"] == [[G, 12], [X, 3]]
    assert after["current"] not in (G, X) and after["cut"] == 0
    assert before == lin(G, [(X, 3)], hardened=12, cut=5), "the argument is left alone"


def test_promote_keeps_at_most_max_history():
    """History keeps the newest MAX_HISTORY entries."""
    one = lin()
    for _ in range(protocol.MAX_HISTORY + 3):
        one = lineage.promote(one)
    assert len(one["history"]) == protocol.MAX_HISTORY
    protocol.LINEAGE.check(one, "lineage")


@pytest.mark.parametrize("dirty", [True, False])
def test_demote_records_own_writes(dirty):
    """Event 3: own is whether the primary held change bits; the cut stays."""
    after = lineage.demote(lin(cut=9, hardened=4), dirty)
    assert after["own"] is dirty and after["cut"] == 9 and after["current"] == G


def test_take_of_another_generation_moves_to_it():
    """Event 4/5 with a new gen: history gets the old one, hardened n, own off."""
    after = lineage.take(lin(G, hardened=7, cut=9, own=True), H, 20)
    assert after == lin(H, [(G, 7)], hardened=20, cut=0, own=False)


def test_take_of_the_same_generation_only_advances():
    """Event 4/5 with its own gen: hardened n, history untouched."""
    after = lineage.take(lin(G, [(X, 1)], hardened=7, own=True), G, 8)
    assert after == lin(G, [(X, 1)], hardened=8, own=False)


def test_replaced_breaks_the_lineage():
    """Event 6: nothing of the old lineage is kept."""
    after = lineage.replaced()
    assert after["history"] == [] and after["hardened"] == 0


# ---------------------------------------------------------------- the rules

RULES = [
    # rule, kind, src, tgt
    (1, "in-sync", st(hardened=5), st(hardened=5)),
    (1, "in-sync", st(dirty=True, cut=7), st(hardened=6)),          # a mirror mid-cycle
    (2, "target-newer", st(hardened=6), st(cut=7)),            # a primary cut past it
    (2, "target-newer", st(hardened=5), st(dirty=True, hardened=5)),
    (3, "diverged", st(dirty=True, hardened=5), st(dirty=True, hardened=5)),
    (4, "source-newer", st(H, [(G, 12)]), st(G, hardened=12)),
    (4, "source-newer", st(dirty=True, current=H, history=[(G, 12)]), st(G, cut=12)),
    (5, "diverged", st(H, [(G, 12)]), st(dirty=True, current=G, cut=12)),
    (5, "diverged", st(H, [(G, 12)]), st(G, cut=13)),          # a drain past the branch
    (5, "diverged", st(H, [(G, 12)]), st(G, hardened=14)),
    (6, "target-newer", st(G, hardened=12), st(H, [(G, 12)])),
    (7, "diverged", st(dirty=True, current=G, hardened=12), st(H, [(G, 12)])),
    (8, "diverged", st(H, [(G, 12)]), st(K, [(G, 12)])),
    (9, "unrelated", st(G), st(H)),
]


@pytest.mark.parametrize("rule, kind, src, tgt", RULES)
def test_every_rule(rule, kind, src, tgt):
    """Each row of the table gives its kind and names its rule."""
    v = compare(src, tgt, "a/vol0", "b/vol0")
    assert (v.rule, v.kind) == (rule, kind)
    assert f"[lineage rule {rule}]" in v.why()
    assert v.safe is (kind in ("in-sync", "source-newer"))


def test_every_rule_has_a_row():
    """The table's nine rules are all walked."""
    assert {r[0] for r in RULES} == set(range(1, 10))


@pytest.mark.parametrize("rule, kind, src, tgt", RULES)
def test_swapping_sides_swaps_newer(rule, kind, src, tgt):
    """compare(b, a) is the mirror image of compare(a, b); in one generation
    the newer side's verdict as a source is in-sync (rule 1: its changes are
    what a mirror sends)."""
    back = compare(tgt, src).kind
    mirror = {"source-newer": "target-newer", "target-newer": "source-newer"}
    if kind == "in-sync":
        assert back in ("in-sync", "target-newer")
    elif rule == 2:
        assert back == "in-sync"
    else:
        assert back == mirror.get(kind, kind)


def test_line_names_both_generations():
    """The line names both sides, their generations and the branch point."""
    v = compare(st(G, cut=12, dirty=True), st(H, [(G, 12)], dirty=True),
                "a/vol0", "b/vol0")
    assert v.kind == "diverged"
    assert v.line() == (f"a/vol0 at generation {G[:8]} (group 12 + writes) and b/vol0 at"
                        f" generation {H[:8]} (from {G[:8]} at group 12 + writes)")
    assert v.common == (G, 12)


def test_first_pair_is_unrelated_and_first():
    """Two fresh nodes share nothing: unrelated, and the target never held data."""
    v = compare({"lineage": lineage.fresh(), "dirty": True},
                {"lineage": lineage.fresh(), "dirty": False})
    assert (v.kind, v.first) == ("unrelated", True)


def test_a_target_that_held_groups_is_not_first():
    """An unrelated target that hardened groups once is not a new one."""
    v = compare(st(H), st(G, [(X, 4)], hardened=9))
    assert (v.kind, v.first) == ("unrelated", False)


def test_dirty_falls_back_to_own():
    """A status without "dirty" counts a secondary's own writes."""
    v = compare({"lineage": lin(hardened=5)}, {"lineage": lin(hardened=5, own=True)})
    assert v.kind == "target-newer"


# ------------------------------------------------------ stories of issue 18

def test_failover_then_failback_sends_from_the_promoted_side():
    """b promoted at group 12 and written; a demoted clean at cut 12: b -> a."""
    a, b = lin(G, hardened=0, cut=12), lin(G, hardened=12)
    b = lineage.promote(b)
    a = lineage.demote(a, dirty=False)
    assert compare({"lineage": b, "dirty": True}, {"lineage": a, "dirty": a["own"]}
                   ).kind == "source-newer"
    assert compare({"lineage": a, "dirty": False}, {"lineage": b, "dirty": True}
                   ).kind == "target-newer", "a mirror from site a refuses"


def test_failover_with_a_healthy_and_written_is_split_brain():
    """a kept writing after b was promoted: diverged both ways."""
    a, b = lin(G, cut=12), lineage.promote(lin(G, hardened=12))
    assert compare({"lineage": b, "dirty": True}, {"lineage": a, "dirty": True}
                   ).kind == "diverged"
    assert compare({"lineage": a, "dirty": True}, {"lineage": b, "dirty": True}
                   ).kind == "diverged"


def test_switchover_round_trip_stays_in_one_line():
    """Switchover: a demoted clean, b promoted, a assumes b's generation:
    b -> a in sync; back again: a promoted, b demoted clean and takes a's."""
    a, b = lin(G, cut=12), lin(G, hardened=12)
    a = lineage.demote(a, dirty=False)
    b = lineage.promote(b)
    a = lineage.take(a, b["current"], 12)
    assert compare({"lineage": b, "dirty": True}, {"lineage": a, "dirty": False}
                   ).kind == "in-sync"
    b["cut"] = 20
    a = lineage.take(a, b["current"], 20)
    b = lineage.demote(b, dirty=False)
    a = lineage.promote(a)
    b = lineage.take(b, a["current"], 20)
    assert compare({"lineage": a, "dirty": True}, {"lineage": b, "dirty": False}
                   ).kind == "in-sync"


def test_dr_test_round_trip_returns_to_the_old_generation():
    """A DR test: promoted, written, demoted with own writes, then assumes the
    primary's generation at its hardened group: in sync again."""
    b = lin(G, hardened=12)
    b = lineage.promote(b)
    b = lineage.demote(b, dirty=True)
    assert compare({"lineage": lin(G, cut=13), "dirty": True},
                   {"lineage": b, "dirty": True}).kind == "diverged"
    b = lineage.take(b, G, 12)
    assert compare({"lineage": lin(G, cut=13), "dirty": True},
                   {"lineage": b, "dirty": False}).kind == "in-sync"


def test_a_replaced_primary_file_is_unrelated_to_its_secondary():
    """Event 6 on the primary: no common generation with the secondary."""
    assert compare({"lineage": lineage.replaced(), "dirty": False},
                   st(G, hardened=12)).kind == "unrelated"
