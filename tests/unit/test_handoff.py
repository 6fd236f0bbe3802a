"""The handoff table's expiries (extproc/handoff.py): one sweep timer for every parked
session, so each is resolved once, when its own time comes, and a claimed one never."""

from __future__ import annotations

import asyncio

from gateway_extproc.extproc.handoff import KEY_BYTES, KEYS_PER_READ, Handoff
from gateway_extproc.extproc.session import Outcome
from tests.waiting import eventually


class Parked:
    """Stands for a routed Session: records how the table resolved it."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def close(self, outcome: Outcome = Outcome.CANCELLED) -> None:
        self.ended.append(str(outcome))

    def hand_over(self) -> None:
        self.ended.append("handed_over")


async def test_claimed_sessions_are_never_expired_and_unclaimed_ones_are_once():
    table = Handoff(claim_window_s=0.2, orphan_grace_s=0.05)
    claimed = [Parked() for _ in range(50)]
    for index, session in enumerate(claimed):
        key = table.new_key()
        table.park(key, session)  # type: ignore[arg-type]
        if index % 10 == 0:
            await asyncio.sleep(0)
        assert table.claim(key) is session
    unclaimed = Parked()
    table.park(table.new_key(), unclaimed)  # type: ignore[arg-type]
    cut = Parked()
    cut_key = table.new_key()
    table.park(cut_key, cut)  # type: ignore[arg-type]
    table.routing_ended(cut_key)  # the client left: the shorter grace applies

    await eventually(lambda: cut.ended, what="the cut session resolved after its grace")
    await eventually(lambda: unclaimed.ended, what="the unclaimed session resolved")
    # Observers claim here: an unclaimed session is a client that left, resolved once.
    assert unclaimed.ended == ["cancelled"] and cut.ended == ["cancelled"]
    assert len(table) == 0
    # Every claimed session's window ended before the unclaimed one's (parked later):
    # their expiry times have all come and gone, and none was resolved.
    assert all(not session.ended for session in claimed)


async def test_handoff_keys_are_all_different_across_reads_of_randomness():
    table = Handoff()
    keys = [table.new_key() for _ in range(3 * KEYS_PER_READ)]
    assert len(set(keys)) == len(keys)
    random_parts = {key.split(".", 1)[1] for key in keys}
    assert len(random_parts) == len(keys)
    # 128 bits each, URL-safe base64 without padding, as secrets.token_urlsafe writes.
    assert all(len(part) == 22 for part in random_parts) and KEY_BYTES == 16
