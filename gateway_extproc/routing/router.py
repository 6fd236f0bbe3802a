"""The router: from a model lookup to a chosen pod, or the error a client must see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway_extproc import errors, telemetry
from gateway_extproc.models.registry import ModelRegistry, ModelState, ModelView, Pod
from gateway_extproc.routing.base import NoCandidates, RoutingRequest, Strategy
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.filters import HealthyFilter
from gateway_extproc.routing.health import PodHealth
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.measured import ResponseTiming
from gateway_extproc.routing.plugins import Filter
from gateway_extproc.routing.prompt_blocks import PromptPreparer
from gateway_extproc.routing.registry import RoutingConfigError


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    model: str
    pods: tuple[Pod, ...]  # the pick first, then fallbacks in preference order
    strategy: str

    @property
    def pod(self) -> Pod:
        return self.pods[0]

    @property
    def destination(self) -> str:
        return ",".join(p.address for p in self.pods)


class Router:
    def __init__(
        self,
        registry: ModelRegistry,
        catalog: StrategyCatalog,
        default_strategy: str,
        inflight: InFlightCounter,
        *,
        fallback_endpoints: int = 0,
        retry_after: int = 5,
        preparer: PromptPreparer | None = None,
        health: PodHealth | None = None,
        filters: Sequence[Filter] = (),
    ) -> None:
        default = catalog.resolve(default_strategy)
        if default is None:
            raise RoutingConfigError(
                f"unknown default strategy {default_strategy!r}; known: {catalog.names()}"
            )
        self.registry = registry
        self.inflight = inflight
        # Sessions report how each response ended; failing pods drop out of candidates.
        self.health = health or PodHealth(in_flight=inflight.count)
        self._catalog = catalog
        # Applied to every request before its strategy's own: the registry's request
        # filters (the subset hint), passive health, then the server's (flow control's
        # saturation filter).
        self._filters = (*catalog.request_filters, HealthyFilter(self.health), *filters)
        self._default = default
        self._fallbacks = fallback_endpoints
        self._retry_after = retry_after
        self._preparer = preparer

    def strategy(self, name: str | None) -> Strategy:
        """The strategy a request asked for (header), or the default; 400 if unknown."""
        if not name:
            return self._default
        found = self._catalog.resolve(name)
        if found is None:
            raise errors.invalid_routing_strategy(name, self._catalog.names())
        return found

    def check_model(self, model: str) -> ModelView:
        """The model's view if it can take a request now; the client's error if not."""
        view = self.registry.lookup(model)
        if view.state is ModelState.READY:
            return view
        if view.state is ModelState.ABSENT:
            raise errors.model_not_found(model)
        if view.state is ModelState.TERMINATING:
            raise errors.model_terminating(model, self._retry_after)
        raise errors.no_ready_pods(model, self._retry_after)

    def prepare(
        self, request: RoutingRequest, strategy: Strategy
    ) -> RoutingRequest | asyncio.Future[RoutingRequest]:
        """`request` with what the strategy needs beyond the request itself (the prompt's
        KV blocks for precise prefix scoring), now or as a future that never fails."""
        if self._preparer is None or not _uses_tokens(strategy):
            return request
        view = self.registry.lookup(request.model)
        if view.state is not ModelState.READY:
            return request  # route() answers with the error
        return self._preparer.prepare(request, view.routable)

    def route(
        self,
        request: RoutingRequest,
        strategy: Strategy,
        subset: frozenset[str] | None = None,
    ) -> RoutingDecision:
        """Pick a pod (and fallbacks) and count the request in flight on it."""
        started = time.perf_counter()
        view = self.check_model(request.model)
        if subset is not None:
            request = replace(request, subset=subset)
        candidates: Sequence[Pod] = view.routable
        try:
            for keep in self._filters:  # profile.apply_filters, inlined: per decision
                kept = keep.filter(candidates, request)
                if kept:
                    candidates = kept
                elif not keep.fail_open:
                    raise NoCandidates(keep.empty_detail())
            ranked = strategy.rank(candidates, request, 1 + self._fallbacks)
            # The snapshot may be older than the registry: a pod that turned terminating
            # since must never be chosen.
            live = [p for p in ranked if self.registry.is_routable(p, request.model)]
            if not live:
                live = self._rerank(candidates, request, strategy)
        except NoCandidates as exc:
            raise errors.no_ready_pods(request.model, self._retry_after, exc.detail) from None
        decision = RoutingDecision(request.model, tuple(live), strategy.name)
        self.inflight.acquire(request.model, decision.pod)
        telemetry.ROUTING_DECISION.observe(time.perf_counter() - started)
        return decision

    def _rerank(
        self, candidates: Sequence[Pod], request: RoutingRequest, strategy: Strategy
    ) -> list[Pod]:
        """Rank again among the candidates still routable."""
        still = tuple(p for p in candidates if self.registry.is_routable(p, request.model))
        if not still:
            raise NoCandidates("")
        reranked = strategy.rank(still, request, 1 + self._fallbacks)
        return [p for p in reranked if p in still] or list(still[: 1 + self._fallbacks])

    def release(self, decision: RoutingDecision) -> None:
        self.inflight.release(decision.model, decision.pod)

    def observed(self, timing: ResponseTiming) -> None:
        """What the gateway measured of a routed response, for strategies that learn
        pod speeds from it."""
        self._catalog.observe(timing)


def _uses_tokens(strategy: Strategy) -> bool:
    """Whether the strategy's scorers read the prompt's KV blocks (a profile knows)."""
    return bool(getattr(strategy, "uses_tokens", False))
