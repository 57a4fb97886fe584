"""What a join does with each lineage verdict (coordinator/mirror/joins.py),
without nodes: statuses built with wire/lineage.py's own events, one pair
(s1/a -> r1/a) of a session file.  Every refusal is one line that names
both generations, the lineage rule and the command that resolves it."""

from __future__ import annotations

import pytest

from coordinator import direction, session as session_mod
from coordinator.errors import DirectionError
from coordinator.mirror import joins
from harness.mirrorrig import mirror_session
from wire import lineage


@pytest.fixture
def s(tmp_path):
    p = tmp_path / "j.toml"
    p.write_text(mirror_session("j", {"s1": "r1"}))
    return session_mod.load(str(p))


def st(lin: dict, dirty: bool = False, replaced: str | None = None) -> dict:
    return {"volumes": {"a": {"lineage": lin, "dirty": dirty, "replaced": replaced}}}


def synced(n: int = 3) -> tuple[dict, dict]:
    """A primary and the secondary that hardened its group ``n``."""
    p = lineage.fresh()
    p = {**p, "cut": n}
    return p, lineage.take(lineage.fresh(), p["current"], n)


def check(s, p, r, **kw):
    return joins.check(s, {"s1": p}, {"r1": r}, source="a", **kw)


def test_in_sync_and_the_first_copy_proceed(s):
    """Same generation (the primary's writes are what a mirror sends); a
    fresh secondary takes its first copy whole."""
    p, r = synced()
    assert [x.kind for x in check(s, st(p, dirty=True), st(r))] == ["in-sync"]
    assert [x.kind for x in check(s, st(lineage.fresh()), st(lineage.fresh()))] == \
        ["unrelated"]


def test_a_promoted_target_is_newer_and_refused(s):
    """After a failover site b is newer: a mirror from a is refused, naming
    the resync (or failback) that sends the safe way."""
    p, r = synced()
    with pytest.raises(DirectionError, match="resync --from b --to a") as ei:
        check(s, st(p), st(lineage.promote(r)))
    assert "lineage rule 6" in str(ei.value) and "\n" not in str(ei.value)


def test_both_written_is_split_brain_until_a_winner_is_named(s):
    """Both sides written since their common generation: refused, naming
    both generations and both resyncs; the named winner proceeds."""
    p, r = synced()
    b = lineage.promote(r)
    with pytest.raises(DirectionError, match="split brain") as ei:
        check(s, st(p, dirty=True), st(b, dirty=True))
    line = str(ei.value)
    assert lineage.short(p["current"]) in line and lineage.short(b["current"]) in line
    assert "resync --from a --to b" in line and "resync --from b --to a" in line
    pairs = check(s, st(p, dirty=True), st(b, dirty=True), winner=True)
    assert [x.kind for x in joins.split(pairs)] == ["diverged"]


def test_unrelated_images_need_a_full_resync(s):
    """A secondary that held another lineage's group (a foreign image):
    only --full joins them; a volume reported replaced likewise."""
    p, _ = synced()
    other = lineage.take(lineage.fresh(), lineage.new_generation(), 5)
    with pytest.raises(DirectionError, match="--full"):
        check(s, st(p), st(other))
    assert check(s, st(p), st(other), full=True)[0].kind == "unrelated"
    p, r = synced()
    gone = "volume a: x.img is not the file node s1 served (inode 1 -> 2): only a full" \
           " resync joins it again (`cgmirror resync --from SOURCE --to TARGET --full`)"
    with pytest.raises(DirectionError, match="--from a --to b --full"):
        check(s, st(p, replaced=gone), st(r))


def test_gens_name_each_secondary_volume_its_primary_generation(s):
    """commit/assume's gens: per secondary, the generation of the primary
    volume each of its volumes mirrors."""
    p, r = synced()
    assert joins.gens(s, {"s1": st(p)}) == {"r1": {"a": p["current"]}}
    assert joins.gens(direction.oriented(s, "b"), {"r1": st(r)}) == \
        {"s1": {"a": r["current"]}}
