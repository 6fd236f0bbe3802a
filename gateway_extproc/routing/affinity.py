"""Session affinity: keep a session (`x-session-id`) on the pod that first served it.

The session stays on that pod while the pod is a candidate (after the profile's
filters); when it is not (deleted, not ready, outside the request's subset, filtered
out) the session moves to whatever the profile's picker picks, and stays there. Requests
without a session id go straight to the picker. The session map is an LRU bounded by
`capacity`; a deleted pod's sessions are dropped with it.

It is a layer of a profile rather than a scorer or a picker: the pick it makes is not a
best score but a memory of an earlier pick, kept whatever the scores say now.

Replicas share sessions through `on_pick` (told of every session placed or moved here)
and `learn` (a session another replica placed); the server wires these to Redis with
`--redis-url` (gateway_extproc/redis_sessions.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.signals import PodSignals

Rank = Callable[[Sequence[Pod], RoutingRequest, int], list[Pod]]


class SessionAffinity:
    def __init__(self, signals: PodSignals, *, capacity: int = 100_000) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._signals = signals
        self._capacity = capacity
        self._pod_of: OrderedDict[str, str] = OrderedDict()
        self.on_pick: Callable[[str, str], None] | None = None

    def rank(
        self, candidates: Sequence[Pod], request: RoutingRequest, count: int, pick: Rank
    ) -> list[Pod]:
        """The session's pod first when it is a candidate, else `pick`'s ranking."""
        session = request.session_id
        if not session or not candidates:
            return pick(candidates, request, count)
        sessions = self._pod_of
        key = sessions.get(session)
        if key is not None:
            position = self._signals.candidates(candidates).index.get(key)
            if position is not None:
                sessions.move_to_end(session)
                sticky = candidates[position]
                if count <= 1:
                    return [sticky]
                others = [p for i, p in enumerate(candidates) if i != position]
                return [sticky, *pick(others, request, count - 1)]
        ranked = pick(candidates, request, count)
        self.learn(session, ranked[0].key)
        if self.on_pick is not None:
            self.on_pick(session, ranked[0].key)
        return ranked

    def learn(self, session: str, pod_key: str) -> None:
        """Keep `session` on `pod_key` (placed here, or by another replica)."""
        sessions = self._pod_of
        sessions[session] = pod_key
        sessions.move_to_end(session)
        if len(sessions) > self._capacity:
            sessions.popitem(last=False)

    def pod_of(self, session_id: str) -> str | None:
        return self._pod_of.get(session_id)

    def __len__(self) -> int:
        return len(self._pod_of)

    def forget(self, pod_key: str) -> None:
        stale = [s for s, key in self._pod_of.items() if key == pod_key]
        for session in stale:
            del self._pod_of[session]
