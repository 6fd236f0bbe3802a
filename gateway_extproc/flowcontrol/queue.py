"""FairQueue: requests waiting for one model, in the order they may leave.

Highest priority first; within a priority, round-robin across fairness ids (each id's
own requests in arrival order), so a tenant with ten times the requests waiting gets
the same turns as one with a single request waiting, not ten times as many.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        # priority -> fairness id -> its waiting items. A dict keeps insertion order: the
        # first id is the next to be served, and an id served goes to the back.
        self._levels: dict[int, dict[str, deque[T]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, priority: int, fairness_id: str, item: T) -> None:
        level = self._levels.setdefault(priority, {})
        items = level.get(fairness_id)
        if items is None:
            items = level[fairness_id] = deque()
        items.append(item)
        self._size += 1

    def peek(self) -> T | None:
        """The next item to leave, without taking it."""
        if not self._size:
            return None
        level = self._levels[max(self._levels)]
        return level[next(iter(level))][0]

    def pop(self) -> T:
        """Take the next item; its fairness id moves to the back of its priority's turn."""
        if not self._size:
            raise IndexError("pop from an empty FairQueue")
        priority = max(self._levels)
        level = self._levels[priority]
        fairness_id = next(iter(level))
        items = level.pop(fairness_id)
        item = items.popleft()
        if items:
            level[fairness_id] = items  # re-inserted: now last in turn
        elif not level:
            del self._levels[priority]
        self._size -= 1
        return item

    def remove(self, priority: int, fairness_id: str, item: T) -> bool:
        """Take `item` out wherever it is (a client that left); False if not queued."""
        level = self._levels.get(priority)
        items = level.get(fairness_id) if level is not None else None
        if items is None or level is None:
            return False
        try:
            items.remove(item)
        except ValueError:
            return False
        if not items:
            del level[fairness_id]
            if not level:
                del self._levels[priority]
        self._size -= 1
        return True
