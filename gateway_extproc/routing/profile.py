"""Profile: a routing strategy made of plugins. Its filters drop candidates, its picker
(bound to its weighted scorers) chooses among the rest; with session affinity, a
session's earlier pick comes first while its pod passes the filters."""

from __future__ import annotations

from collections.abc import Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.affinity import SessionAffinity
from gateway_extproc.routing.base import NoCandidates, RoutingRequest
from gateway_extproc.routing.plugins import Filter, Picker, Scorer


def apply_filters(
    filters: Sequence[Filter], candidates: Sequence[Pod], request: RoutingRequest
) -> Sequence[Pod]:
    """The candidates every filter keeps, in order; NoCandidates when one keeps none
    (unless it fails open, and then it keeps them all)."""
    for keep in filters:
        kept = keep.filter(candidates, request)
        if not kept:
            if keep.fail_open:
                continue
            raise NoCandidates(keep.empty_detail())
        candidates = kept
    return candidates


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
        # Whether the router must prepare the prompt's KV blocks first: asked per request,
        # so found once here.
        self.uses_tokens = any(scorer.uses_tokens for scorer, _ in self.scorers)
        self.sessions = sessions
        if not self.filters and sessions is None:
            # Nothing to do before the picker: the router calls it directly, one Python
            # call less per decision (routing cost is measured in microseconds).
            self.rank = picker.rank  # type: ignore[method-assign]

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        candidates = apply_filters(self.filters, candidates, request)
        if self.sessions is not None:
            return self.sessions.rank(candidates, request, count, self.picker.rank)
        return self.picker.rank(candidates, request, count)
