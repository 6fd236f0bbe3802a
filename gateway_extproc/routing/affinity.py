"""SessionAffinityStrategy: keep a session (`x-session-id`) on the pod that first served it.

The session stays on that pod while the pod is a candidate; when it is not (deleted,
not ready, outside the request's subset) the session moves to whatever the fallback
strategy picks, and stays there. Requests without a session id go straight to the
fallback. The session map is an LRU bounded by `capacity`; a deleted pod's sessions are
dropped with it.

Replicas share sessions through `on_pick` (told of every session placed or moved here)
and `learn` (a session another replica placed); the server wires these to Redis with
`--redis-url` (gateway_extproc/redis_sessions.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.signals import PodSignals


class SessionAffinityStrategy:
    name = "session-affinity"

    def __init__(self, fallback: Strategy, signals: PodSignals, *, capacity: int = 100_000) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._fallback = fallback
        self._signals = signals
        self._capacity = capacity
        self._pod_of: OrderedDict[str, str] = OrderedDict()
        self.on_pick: Callable[[str, str], None] | None = None

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        session = request.session_id
        if not session or not candidates:
            return self._fallback.rank(candidates, request, count)
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
                return [sticky, *self._fallback.rank(others, request, count - 1)]
        ranked = self._fallback.rank(candidates, request, count)
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
