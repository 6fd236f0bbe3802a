"""FairQueue: higher priority first, then round-robin across fairness ids."""

from __future__ import annotations

import pytest

from gateway_extproc.flowcontrol.queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while queue:
        out.append(queue.pop())
    return out


def test_higher_priority_leaves_first_whatever_the_arrival_order():
    queue: FairQueue[str] = FairQueue()
    queue.push(0, "", "normal-1")
    queue.push(-1, "", "sheddable")
    queue.push(10, "", "urgent")
    queue.push(0, "", "normal-2")
    assert drain(queue) == ["urgent", "normal-1", "normal-2", "sheddable"]


def test_tenants_take_turns_however_many_each_has_waiting():
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push(0, "heavy", f"h{i}")
    queue.push(0, "light", "l0")
    queue.push(0, "light", "l1")
    assert drain(queue) == ["h0", "l0", "h1", "l1", "h2", "h3", "h4"]


def test_a_tenant_that_arrives_later_gets_the_next_turn_after_those_before_it():
    queue: FairQueue[str] = FairQueue()
    queue.push(0, "a", "a0")
    queue.push(0, "a", "a1")
    assert queue.pop() == "a0"
    queue.push(0, "b", "b0")
    assert drain(queue) == ["a1", "b0"]


def test_peek_shows_what_pop_takes():
    queue: FairQueue[str] = FairQueue()
    assert queue.peek() is None
    queue.push(0, "a", "a0")
    queue.push(5, "b", "b0")
    assert queue.peek() == "b0"
    assert queue.pop() == "b0"
    assert queue.peek() == "a0"


def test_remove_takes_an_item_out_wherever_it_is():
    queue: FairQueue[str] = FairQueue()
    queue.push(0, "a", "a0")
    queue.push(0, "a", "a1")
    queue.push(3, "b", "b0")
    assert queue.remove(0, "a", "a0")
    assert queue.remove(3, "b", "b0")
    assert not queue.remove(3, "b", "b0")
    assert not queue.remove(7, "x", "a1")
    assert len(queue) == 1
    assert drain(queue) == ["a1"]
    with pytest.raises(IndexError):
        queue.pop()
