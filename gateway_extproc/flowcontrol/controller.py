"""FlowController: admits each request now, refuses it, or holds it until it may go.

The session asks `admit` at the moment it would route. The answer is one of:

- routed now (returns None): nothing waits, no queue and a pod with room; the common
  case costs a dictionary lookup or two;
- refused (raises the client's GatewayError): over a rate limit, or sheddable (negative
  priority) while every candidate pod is saturated, or a model that cannot be waited for;
- held (returns an `Admission`): the service awaits it before answering Envoy, so the
  gRPC stream simply stays unanswered while the request waits. It ends routed (the
  session's route callback ran), or with an error for the client: 429 `queue_timeout`
  after `--queue-timeout`, 503 `no_ready_pods` when no pod of the model turned ready
  within `--wait-for-pods`, or the model's own error (deleted, terminating).

Held requests are dispatched in `FairQueue` order whenever a pod may have room: an
in-flight request ends, a scrape lands, the model dictionary changes, and (because
metrics going stale is no event) on a short tick while anything waits. Dispatching runs
the route callback at once, so the in-flight count moves before the next request is
considered and no two held requests are given the same slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import structlog

from gateway_extproc import errors, telemetry
from gateway_extproc.errors import GatewayError
from gateway_extproc.flowcontrol.classify import FlowKey, flow_key, screen_headers
from gateway_extproc.flowcontrol.config import HeaderTrust
from gateway_extproc.flowcontrol.limits import RateLimiter
from gateway_extproc.flowcontrol.queue import FairQueue
from gateway_extproc.flowcontrol.saturation import SaturationDetector, routable_in
from gateway_extproc.models.registry import ModelRegistry, ModelState
from gateway_extproc.openai.usage import Usage

log = structlog.get_logger("gateway_extproc.flowcontrol")

# While anything waits, dispatch is also tried this often: metrics that go stale (and so
# stop making a pod look full) announce themselves with no event.
TICK_S = 0.25


@dataclass(frozen=True, slots=True)
class FlowRequest:
    model: str
    key: FlowKey
    subset: frozenset[str] | None = None  # Envoy's endpoint subset hint, if any


class Room(Enum):
    FREE = "free"  # a candidate pod can take it now
    FULL = "full"  # every candidate pod is saturated
    NO_PODS = "no_pods"  # the model exists, no pod of it is ready
    SETTLED = "settled"  # routing will answer at once (model gone, terminating, empty subset)


class Admission:
    """A held request: await `wait()`, then read `error` (None: it was routed)."""

    __slots__ = (
        "awaiting_pods",
        "done",
        "enqueued_at",
        "error",
        "priority_label",
        "queued",
        "request",
        "route",
        "task",
        "timer",
    )

    def __init__(self, request: FlowRequest, route: Callable[[], None], label: str) -> None:
        self.request = request
        self.route = route
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None
        self.priority_label = label
        self.enqueued_at = 0.0
        self.awaiting_pods = False
        self.queued = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        await self.done

    def _settle(self, error: BaseException | None = None) -> None:
        self.error = error
        if not self.done.done():
            self.done.set_result(None)


class FlowController:
    def __init__(
        self,
        registry: ModelRegistry,
        saturation: SaturationDetector,
        limiter: RateLimiter,
        *,
        objectives: Mapping[str, int],
        header_policy: Mapping[str, HeaderTrust],
        queue_timeout: float,
        wait_for_pods: float,
        retry_after: int,
        write_metadata: bool = False,
    ) -> None:
        self._registry = registry
        self.saturation = saturation
        self.limiter = limiter
        self._objectives = dict(objectives)
        self._priority_labels = {0, *self._objectives.values()}
        self.header_policy = dict(header_policy)
        self.queue_timeout = queue_timeout
        self.wait_for_pods = wait_for_pods
        self._retry_after = retry_after
        self.write_metadata = write_metadata
        self._queues: dict[str, FairQueue[Admission]] = {}
        self._held = 0
        self._dispatch_soon: asyncio.Handle | None = None
        self._tick: asyncio.TimerHandle | None = None

    @property
    def max_hold(self) -> float:
        """The longest a request can be held (Envoy's message timeout must cover it)."""
        return self.wait_for_pods + self.queue_timeout

    @property
    def held(self) -> int:
        return self._held

    # -- classifying --------------------------------------------------------------------

    def screen_headers(self, headers: dict[str, str]) -> None:
        screen_headers(headers, self.header_policy)

    def flow_key(self, headers: Mapping[str, str], body_user: str) -> FlowKey:
        return flow_key(headers, body_user, self._objectives)

    # -- admission ----------------------------------------------------------------------

    def admit(self, request: FlowRequest, route: Callable[[], None]) -> Admission | None:
        """Route now (None), refuse (raises GatewayError), or hold (an Admission)."""
        room = self._room(request)
        if room is Room.SETTLED:
            route()  # a model gone or terminating: the router's answer, nothing counted
            return None
        if self.limiter.shared:
            admission = Admission(request, route, self._label(request.key.priority))
            task = asyncio.get_running_loop().create_task(self._admit_shared(admission))
            admission.task = task
            return admission
        if self.limiter.enabled:
            self._check_limits(request)  # changes no pod's room
        if self._go_now(request, route, room):
            return None
        admission = Admission(request, route, self._label(request.key.priority))
        self._hold(admission)
        return admission

    def cancel(self, admission: Admission) -> None:
        """The client left (its stream ended) while held: drop it at once."""
        if admission.task is not None and not admission.task.done():
            admission.task.cancel()
        if admission.queued:
            self._dequeue(admission)
            telemetry.FLOW_ABANDONED.labels(admission.request.model).inc()
        admission._settle(asyncio.CancelledError())

    def record_usage(self, key: FlowKey, usage: Usage) -> None:
        """A finished request's tokens: its tenant's token window and metrics."""
        label = self.limiter.tenant_label(key.fairness_id)
        telemetry.child(telemetry.TENANT_TOKENS, label, "prompt").inc(usage.prompt_tokens)
        telemetry.child(telemetry.TENANT_TOKENS, label, "completion").inc(usage.completion_tokens)
        self.limiter.record_tokens(key.fairness_id, usage.prompt_tokens + usage.completion_tokens)

    async def _admit_shared(self, admission: Admission) -> None:
        request = admission.request
        try:
            await self._check_shared_limits(request)
            if self._go_now(request, admission.route):
                admission._settle()
                return
        except GatewayError as error:
            admission._settle(error)
            return
        except Exception as exc:  # a bug: the stream fails as it would unqueued
            log.exception("flow_admission_failed", model=request.model)
            admission._settle(exc)
            return
        self._hold(admission)

    def _check_limits(self, request: FlowRequest) -> None:
        try:
            self.limiter.check(request.key.fairness_id)
        except GatewayError as error:
            self._count_rejection(request.model, f"rate_limit_{error.type}")
            raise

    async def _check_shared_limits(self, request: FlowRequest) -> None:
        try:
            await self.limiter.check_shared(request.key.fairness_id)
        except GatewayError as error:
            self._count_rejection(request.model, f"rate_limit_{error.type}")
            raise

    def _go_now(
        self, request: FlowRequest, route: Callable[[], None], room: Room | None = None
    ) -> bool:
        """Route at once when nothing needs to wait; refuse what must not wait; False
        when the request is to be held. `room`: the request's room if known now (asked
        in the same step, nothing awaited since)."""
        if room is None:
            room = self._room(request)
        queued = request.model in self._queues
        if room is Room.SETTLED or (room is Room.FREE and not queued):
            route()
            return True
        if room is Room.NO_PODS and (not self.wait_for_pods or request.key.sheddable):
            route()  # answers no_ready_pods, as without flow control
            return True
        if request.key.sheddable and room is not Room.FREE:
            self._count_rejection(request.model, "request_shed")
            raise errors.request_shed(request.model, self._retry_after)
        return False

    def _room(self, request: FlowRequest) -> Room:
        view = self._registry.lookup(request.model)
        if view.state is ModelState.UNAVAILABLE:
            return Room.NO_PODS
        if view.state is not ModelState.READY:
            return Room.SETTLED
        pods = routable_in(view.routable, request.subset)
        if not pods:
            return Room.SETTLED
        if not self.saturation.enabled or self.saturation.has_room(pods):
            return Room.FREE
        return Room.FULL

    # -- holding ------------------------------------------------------------------------

    def _hold(self, admission: Admission) -> None:
        request = admission.request
        loop = asyncio.get_running_loop()
        admission.awaiting_pods = self._room(request) is Room.NO_PODS
        timeout = self.wait_for_pods if admission.awaiting_pods else self.queue_timeout
        admission.timer = loop.call_later(timeout, self._expire, admission)
        admission.enqueued_at = time.monotonic()
        admission.queued = True
        queue = self._queues.get(request.model)
        if queue is None:
            queue = self._queues[request.model] = FairQueue()
        queue.push(request.key.priority, request.key.fairness_id, admission)
        self._held += 1
        telemetry.FLOW_QUEUE_LENGTH.labels(request.model, admission.priority_label).inc()
        if self._tick is None:
            self._tick = loop.call_later(TICK_S, self._on_tick)
        self.wake()  # a pod may have room already (others were queued before this one)

    def _dequeue(self, admission: Admission) -> None:
        request = admission.request
        admission.queued = False
        if admission.timer is not None:
            admission.timer.cancel()
        queue = self._queues.get(request.model)
        if queue is not None:
            queue.remove(request.key.priority, request.key.fairness_id, admission)
            if not queue:
                del self._queues[request.model]
        self._left(admission)

    def _left(self, admission: Admission) -> None:
        """Bookkeeping for an admission that is no longer queued."""
        self._held -= 1
        model, label = admission.request.model, admission.priority_label
        telemetry.FLOW_QUEUE_LENGTH.labels(model, label).dec()
        waited = time.monotonic() - admission.enqueued_at
        telemetry.FLOW_QUEUE_WAIT.labels(model, label).observe(waited)

    def _expire(self, admission: Admission) -> None:
        if not admission.queued:
            return
        request = admission.request
        if admission.awaiting_pods and self._room(request) is not Room.NO_PODS:
            # The model's pods came, but are busy: from now on it waits for room.
            admission.awaiting_pods = False
            loop = asyncio.get_running_loop()
            admission.timer = loop.call_later(self.queue_timeout, self._expire, admission)
            return
        self._dequeue(admission)
        if admission.awaiting_pods:
            self._count_rejection(request.model, "no_ready_pods")
            self._run(admission)  # the router's answer: no_ready_pods, or terminating
            return
        self._count_rejection(request.model, "queue_timeout")
        admission._settle(
            errors.queue_timeout(request.model, self.queue_timeout, self._retry_after)
        )

    # -- dispatching --------------------------------------------------------------------

    def wake(self, *_: object) -> None:
        """Something changed that may give a held request room: dispatch soon (once per
        turn of the event loop however many events came)."""
        if self._held and self._dispatch_soon is None:
            self._dispatch_soon = asyncio.get_running_loop().call_soon(self._dispatch)

    def _on_tick(self) -> None:
        self._tick = None
        if self._held:
            self._dispatch()
            self._tick = asyncio.get_running_loop().call_later(TICK_S, self._on_tick)

    def _dispatch(self) -> None:
        self._dispatch_soon = None
        for model in list(self._queues):
            queue = self._queues[model]
            while queue:
                admission = queue.peek()
                assert admission is not None
                room = self._room(admission.request)
                if room is Room.FULL or room is Room.NO_PODS:
                    break  # the head waits, and so does everything behind it
                queue.pop()
                admission.queued = False
                if admission.timer is not None:
                    admission.timer.cancel()
                self._left(admission)
                self._run(admission)
            if not queue:
                del self._queues[model]

    def _run(self, admission: Admission) -> None:
        """Route a held request now; whatever the router says is its answer."""
        try:
            admission.route()
        except GatewayError as error:
            admission._settle(error)
        except Exception as exc:  # a bug: the stream fails as it would unqueued
            log.exception("held_request_routing_failed", model=admission.request.model)
            admission._settle(exc)
        else:
            admission._settle()

    # -- labels -------------------------------------------------------------------------

    def _label(self, priority: int) -> str:
        return (
            str(priority) if priority in self._priority_labels else telemetry.OTHER_PRIORITY_LABEL
        )

    def _count_rejection(self, model: str, reason: str) -> None:
        if self._registry.lookup(model).state is ModelState.ABSENT:
            model = telemetry.UNKNOWN_MODEL_LABEL  # client-chosen names stay unlabelled
        telemetry.FLOW_REJECTIONS.labels(model, reason).inc()
