"""Profile: a routing strategy made of plugins. Its filters drop candidates, its picker
(bound to its weighted scorers) chooses among the rest; with session affinity, a
session's earlier pick comes first while its pod passes the filters."""

from __future__ import annotations

from collections.abc import Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.affinity import SessionAffinity
from gateway_extproc.routing.base import NoCandidates, RoutingRequest
from gateway_extproc.routing.plugins import Filter, Picker, Scorer


class Profile:
    """A `Strategy`: what the router calls, by the name a request or the default asks
    for."""

    def __init__(
        self,
        name: str,
        picker: Picker,
        *,
        filters: Sequence[Filter] = (),
        scorers: Sequence[tuple[Scorer, float]] = (),
        sessions: SessionAffinity | None = None,
    ) -> None:
        self.name = name
        self.picker = picker
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)  # as bound to the picker, for inspection
        self.sessions = sessions
        if not self.filters and sessions is None:
            # Nothing to do before the picker: the router calls it directly, one Python
            # call less per decision (routing cost is measured in microseconds).
            self.rank = picker.rank  # type: ignore[method-assign]

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        for keep in self.filters:
            candidates = keep.filter(candidates, request)
            if not candidates:
                raise NoCandidates(keep.empty_detail())
        if self.sessions is not None:
            return self.sessions.rank(candidates, request, count, self.picker.rank)
        return self.picker.rank(candidates, request, count)
