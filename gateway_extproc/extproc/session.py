"""The per-stream state machine: one Session per ext_proc gRPC stream.

Plain Python with no I/O: `handle(frame)` returns the responses to send, `close()` ends
the stream. Each direction moves headers -> body -> done; the session ends `finished`
(response complete), `rejected` (an ImmediateResponse was sent), `cancelled` (the stream
ended before the response did: the client left) or `aborted` (the response was never
seen, or the stream broke). Rules:

- a body frame after its direction's EndOfStream, a duplicate EndOfStream, or any frame
  after the session ended is a no-op: the empty CONTINUE of its kind (nothing at all in
  FULL_DUPLEX_STREAMED, where the body was already handed back), no state change, no
  parsing, a debug log line only;
- bodies are reassembled from chunks before parsing;
- bookkeeping (in-flight count, request counter, access log) is finalised exactly once.

One step may wait for work off the event loop: when a strategy needs the prompt tokenized
(precise prefix routing) and that takes long, `handle` returns no answer yet and sets
`preparing`; the caller awaits that future and calls `resume()` for the answers.

Another may wait for room: flow control (gateway_extproc/flowcontrol/) may hold the
request until a pod can take it; `handle` (or `resume`) then returns no answer yet and
sets `admission`; the caller awaits it and calls `after_admission()` for the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from functools import partial
from typing import Any

import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from gateway_extproc import errors, telemetry
from gateway_extproc.apis import OPENAI, Api, RoutedPaths, api_for, api_named
from gateway_extproc.errors import GatewayError
from gateway_extproc.extproc import envoy_names as names
from gateway_extproc.extproc import responses
from gateway_extproc.extproc.accounting import ResponseAccounting
from gateway_extproc.flowcontrol.classify import DEFAULT_KEY, FlowKey
from gateway_extproc.flowcontrol.controller import Admission, FlowController, FlowRequest
from gateway_extproc.models.registry import ModelState
from gateway_extproc.openai.models_list import model_body, models_list_body, models_request
from gateway_extproc.openai.requests import (
    MAX_MODEL_NAME,
    InferenceRequest,
    parse_body,
    rewrite_body,
    strip_query,
)
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.health import verdict
from gateway_extproc.routing.measured import ResponseTiming
from gateway_extproc.routing.router import Router, RoutingDecision
from gateway_extproc.tracing import RequestSpan, Tracer

log = structlog.get_logger("gateway_extproc.session")

Mode = processing_mode_pb2.ProcessingMode
NONE = Mode.NONE
STREAMED = Mode.STREAMED
BUFFERED = Mode.BUFFERED
BUFFERED_PARTIAL = Mode.BUFFERED_PARTIAL
FULL_DUPLEX = Mode.FULL_DUPLEX_STREAMED

MODE_NAMES = {
    NONE: "NONE",
    STREAMED: "STREAMED",
    BUFFERED: "BUFFERED",
    BUFFERED_PARTIAL: "BUFFERED_PARTIAL",
    FULL_DUPLEX: "FULL_DUPLEX_STREAMED",
}


class Phase(Enum):
    HEADERS = "headers"
    BODY = "body"  # collecting the body before a decision (request) or accounting
    PASSTHROUGH = "passthrough"  # decided; further chunks only pass through
    DONE = "done"


class Outcome(StrEnum):
    FINISHED = "finished"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    ABORTED = "aborted"


# How a request cut short by its client is counted and logged: nginx's "client closed
# request", which no engine or Envoy sends itself.
CANCELLED_STATUS = 499
CANCELLED_CODE = "client_cancelled"
_OUTCOME_CODES = {Outcome.CANCELLED: CANCELLED_CODE, Outcome.ABORTED: "stream_aborted"}


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    target_pod_header: str = "target-pod"
    inject_include_usage: bool = False
    access_log: bool = True
    # The upstream conformance suite's hooks (envoy_names.CONFORMANCE_*); tests only.
    conformance_mode: bool = False
    tracer: Tracer | None = None  # --otlp-endpoint: a span per request (tracing.py)
    # Used when Envoy does not send protocol_config (older Envoy): the shipped config.
    default_request_body_mode: int = BUFFERED
    default_response_body_mode: int = STREAMED
    # The paths routed to a pod (--allowed-paths); GET /v1/models is answered here anyway.
    routed_paths: RoutedPaths = field(default_factory=RoutedPaths)


Answers = list[ext.ProcessingResponse]


class Session:
    __slots__ = (
        "_accounting",
        "_admission",
        "_alias",
        "_answer",
        "_api",
        "_body",
        "_body_size",
        "_cfg",
        "_configured",
        "_decision",
        "_details",
        "_error_code",
        "_flow",
        "_flow_key",
        "_handoff_key",
        "_headers",
        "_held",
        "_holds_inflight",
        "_method",
        "_model",
        "_path",
        "_queue_wait",
        "_request_id",
        "_request_id_generated",
        "_routed_at",
        "_router",
        "_served",
        "_span",
        "_started",
        "_status",
        "_strategy_name",
        "_subset",
        "_waiting_since",
        "outcome",
        "preparing",
        "req_mode",
        "req_phase",
        "resp_mode",
        "resp_phase",
    )

    def __init__(
        self,
        router: Router,
        config: SessionConfig,
        handoff_key: str = "",
        flow: FlowController | None = None,
    ) -> None:
        self._router = router
        self._cfg = config
        # Flow control decides when (and whether) a request is routed; without it every
        # request is routed at once.
        self._flow = flow
        self._flow_key = DEFAULT_KEY
        self._admission: Admission | None = None  # held by flow control until it settles
        self._answer: Callable[[], Answers] | None = None  # what to send once it has
        # Set when the response will come on another stream (extproc/handoff.py): the
        # routing answer carries it for Envoy to forward to that stream.
        self._handoff_key = handoff_key
        # False for a session that observes a response another process routed: the
        # in-flight count is that process's to release.
        self._holds_inflight = True
        self._configured = False
        self.req_mode: int = config.default_request_body_mode
        self.resp_mode: int = config.default_response_body_mode
        self.req_phase = Phase.HEADERS
        self.resp_phase = Phase.HEADERS
        self.outcome: Outcome | None = None
        self._started = time.monotonic()
        self._routed_at = 0.0
        self._accounting: ResponseAccounting | None = None
        self._served = ""  # the pod that served the response, if Envoy says so
        self._headers: dict[str, str] = {}
        self._path = ""
        self._method = ""
        self._request_id = ""
        self._request_id_generated = False
        self._strategy_name = ""
        self._subset: frozenset[str] | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._model = ""
        self._alias = ""  # the alias the client asked for, when `_model` is its target
        self._api: Api = OPENAI  # the API the request's path speaks (apis/)
        self._span: RequestSpan | None = None  # set when tracing is on
        self._decision: RoutingDecision | None = None
        self._status = 0
        self._details: str | None = None  # Envoy's response code details, when sent
        self._error_code = ""
        # Set while the request waits for its prompt to be prepared off the loop; what
        # the answer needs meanwhile is held in `_held`.
        self.preparing: asyncio.Future[RoutingRequest] | None = None
        self._held: tuple[Any, ...] | None = None
        # Time the request was held before its decision (the span's queue wait).
        self._queue_wait = 0.0
        self._waiting_since = 0.0

    @classmethod
    def observing(
        cls,
        router: Router,
        config: SessionConfig,
        context: dict[str, str],
        flow: FlowController | None = None,
    ) -> Session:
        """A session for a response whose request another process routed (another
        replica or worker: Envoy balances each ext_proc stream on its own), built from
        the context the routing answer wrote (`envoy_names.handoff_context`). It counts
        and accounts for the response like the routing process would have; the pick's
        in-flight count stays that process's, released when its claim window ends."""
        session = cls(router, config, flow=flow)
        session._holds_inflight = False
        with contextlib.suppress(ValueError):
            session._flow_key = FlowKey(
                priority=int(context.get("flow_priority", "0")),
                fairness_id=context.get("flow_fairness_id", ""),
            )
        session._model = model = context.get("model", "")
        session._request_id = context.get("request_id", "")
        session._api = api_named(context.get("api", ""))
        session.req_phase = Phase.DONE
        try:
            age = time.time() - float(context.get("started_at", ""))
        except ValueError:
            age = 0.0
        session._started = session._routed_at = time.monotonic() - min(max(age, 0.0), 3600.0)
        key = context.get("pod", "")
        pod = next((p for p in router.registry.lookup(model).pods if p.key == key), None)
        if pod is not None:
            session._decision = RoutingDecision(model, (pod,), context.get("strategy", ""))
        return session

    @property
    def model(self) -> str:
        return self._model

    @property
    def admission(self) -> Admission | None:
        """Set while flow control holds the request: await it, then `after_admission()`."""
        return self._admission if self._answer is not None else None

    @property
    def awaiting_response(self) -> bool:
        """Routed, and the response has not ended yet."""
        return self._decision is not None and self.outcome is None

    @property
    def request_answered(self) -> bool:
        """No request frame still needs an answer from this stream: the request was
        routed and its body is complete or passes through without being echoed (every
        mode but FULL_DUPLEX_STREAMED, where the processor hands each chunk back)."""
        if self._decision is None:
            return False
        return self.req_phase is Phase.DONE or (
            self.req_phase is Phase.PASSTHROUGH and self.req_mode != FULL_DUPLEX
        )

    # -- entry points -------------------------------------------------------------------

    def handle(self, frame: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        """The responses to send for one frame, in order (possibly none)."""
        if not self._configured:
            self._configure(frame)
        kind = frame.WhichOneof("request")
        if kind is None:
            log.debug("frame_without_phase", request_id=self._request_id)
            return []
        if self.outcome is not None:
            return self._noop(kind, "session ended")
        if kind == "request_headers":
            return self._on_request_headers(frame)
        if kind == "request_body":
            return self._on_request_body(frame.request_body)
        if kind == "request_trailers":
            return self._on_request_trailers()
        if kind == "response_headers":
            return self._on_response_headers(frame)
        if kind == "response_body":
            return self._on_response_body(frame)
        return self._on_response_trailers()

    def close(self, outcome: Outcome = Outcome.CANCELLED) -> None:
        """The stream ended before the session did: Envoy cancelled it because the client
        left (CANCELLED), or it broke (ABORTED)."""
        if self._admission is not None and self._flow is not None:
            self._flow.cancel(self._admission)  # a held client left: out of the queue
            self._admission = self._answer = None
        if self.outcome is None:
            if self._accounting is not None and self._accounting.completed:
                # The stream was cut after the response's last event reached Envoy:
                # Envoy ends the observer stream shortly after the response
                # (deferred_close_timeout), and a processor behind may not have read the
                # last frame yet. The client had the whole response: it finished.
                self._end_response(time.monotonic())
                return
            self._finish(outcome)

    def after_admission(self) -> Answers:
        """The answers for the frame whose request flow control held, now it has
        settled: routed, or refused."""
        admission, answer = self._admission, self._answer
        assert admission is not None and answer is not None, "no request was held"
        self._admission = self._answer = None
        self._queue_wait += time.monotonic() - self._waiting_since
        if isinstance(admission.error, GatewayError):
            return [self._reject(admission.error)]
        if admission.error is not None:
            raise admission.error
        return answer()

    def hand_over(self) -> None:
        """The response is not coming to this process (another one observes it, see
        `observing`): release the pick's in-flight count and end without counting or
        logging the request, which is the observer's to count."""
        if self.outcome is None:
            self.outcome = Outcome.ABORTED
            if self._decision is not None and self._holds_inflight:
                self._router.release(self._decision)

    # -- request path -------------------------------------------------------------------

    def _on_request_headers(self, frame: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        if self.req_phase is not Phase.HEADERS:
            return self._noop("request_headers", "duplicate request headers")
        message = frame.request_headers
        self._headers = names.header_dict(message)
        self._path = strip_query(self._headers.get(":path", ""))
        self._api = api_for(self._path)
        self._method = self._headers.get(":method", "")
        if self._cfg.tracer is not None:
            self._span = self._cfg.tracer.start(self._headers)
        self._request_id = self._headers.get(names.REQUEST_ID_HEADER, "")
        if not self._request_id:
            self._request_id = uuid.uuid4().hex
            self._request_id_generated = True
        refused = self._screen_headers()
        self._strategy_name = self._headers.get(names.ROUTING_STRATEGY_HEADER, "")
        self._subset = names.subset_hint(frame)
        if self._cfg.conformance_mode:
            self._subset = names.conformance_selection(self._headers) or self._subset
        self.req_phase = Phase.DONE if message.end_of_stream else Phase.BODY
        try:
            if refused is not None:
                raise refused
            model_id = models_request(self._method, self._path)
            if model_id is not None:
                return [self._answer_models(model_id)]
            if self._path not in self._cfg.routed_paths:
                # Never an engine's other endpoints (/metrics, vLLM's /sleep), whatever
                # model the request names.
                raise errors.unsupported_route(self._method, self._path)
            length = self._headers.get("content-length", "")
            if (
                self.req_mode not in (BUFFERED, BUFFERED_PARTIAL)
                and length.isdigit()
                and int(length) > self._cfg.max_body_bytes
            ):
                # Refused before the upload. Not when Envoy buffers: it is reading the
                # body meanwhile and may overflow its buffer and start its own 413 first,
                # and a second reply from us would then reset the half-sent response. The
                # body check below (or Envoy's buffer limit) refuses it instead.
                raise errors.request_too_large(self._cfg.max_body_bytes)
            if message.end_of_stream or self.req_mode in (NONE, STREAMED):
                # No body will be seen before the request leaves: decide now.
                model = self._model_from_header(message.end_of_stream)
                request = self._routing_request(model, "", None, self._path)
                self._admit(request, self._router.strategy(self._strategy_name))
                return self._answer_when_admitted(self._answer_routed_headers)
        except GatewayError as error:
            return [self._reject(error)]
        if self.req_mode == FULL_DUPLEX:
            return []  # answered together with the body, once it is complete
        return [responses.CONTINUE_REQUEST_HEADERS]

    def _on_request_body(self, body: ext.HttpBody) -> list[ext.ProcessingResponse]:
        if self.req_phase in (Phase.DONE, Phase.HEADERS):
            return self._noop("request_body", "request body after end of stream")
        if self.req_phase is Phase.PASSTHROUGH:
            if body.end_of_stream:
                self.req_phase = Phase.DONE
            return self._pass_request_chunk(body)
        self._body.append(body.body)
        self._body_size += len(body.body)
        if self._body_size > self._cfg.max_body_bytes:
            return [self._reject(errors.request_too_large(self._cfg.max_body_bytes))]
        if self.req_mode == FULL_DUPLEX and not body.end_of_stream:
            return []
        # BUFFERED delivers the whole body in one frame (end_of_stream is false only when
        # trailers follow); BUFFERED_PARTIAL may deliver a prefix when Envoy's buffer is
        # full; FULL_DUPLEX has now seen the last chunk.
        return self._decide_on_body(
            complete=body.end_of_stream or self.req_mode == BUFFERED,
            body_end=body.end_of_stream,
        )

    def _on_request_trailers(self) -> list[ext.ProcessingResponse]:
        if self.req_phase is Phase.DONE:
            return self._noop("request_trailers", "request trailers after end of stream")
        if self.req_phase is Phase.BODY:
            out = self._decide_on_body(
                complete=True, body_end=False, then=[responses.CONTINUE_REQUEST_TRAILERS]
            )
            if self.outcome is Outcome.REJECTED or self.preparing is not None:
                return out
        else:
            out = [responses.CONTINUE_REQUEST_TRAILERS]
        self.req_phase = Phase.DONE
        return out

    def _decide_on_body(
        self,
        *,
        complete: bool,
        body_end: bool,
        then: list[ext.ProcessingResponse] | None = None,
    ) -> list[ext.ProcessingResponse]:
        """Parse the collected body, route, and answer (followed by `then`); `body_end` is
        the body's own EndOfStream (false when trailers follow or Envoy sent only a
        prefix). Returns nothing yet when the prompt is being prepared off the loop."""
        body = b"".join(self._body)
        self._body = []
        try:
            try:
                parsed = parse_body(self._path, body, self._cfg.max_body_bytes, self._api.as_chat)
            except GatewayError as error:
                if not complete and error.code == "invalid_request_body":
                    # A prefix of a larger body: Envoy's buffer filled before the end.
                    raise errors.request_too_large(self._cfg.max_body_bytes) from None
                raise
            request = self._routing_request(
                parsed.model, parsed.prompt, parsed.document, parsed.endpoint
            )
            strategy = self._router.strategy(self._strategy_name)
            prepared = self._router.prepare(request, strategy)
        except GatewayError as error:
            return [self._reject(error)]
        held = (strategy, parsed, body, complete, body_end, then or [])
        if isinstance(prepared, RoutingRequest):
            return self._answer_body(prepared, *held)
        self.preparing = prepared
        self._held = (request, *held)
        self._waiting_since = time.monotonic()
        return []

    def resume(self) -> list[ext.ProcessingResponse]:
        """The answers held back while `preparing`; call once that future is done."""
        preparing, self.preparing = self.preparing, None
        held, self._held = self._held, None
        self._queue_wait += time.monotonic() - self._waiting_since
        if preparing is None or held is None or self.outcome is not None:
            return []
        request, *rest = held
        if preparing.done() and not preparing.cancelled() and preparing.exception() is None:
            request = preparing.result()
        out = self._answer_body(request, *rest)
        if self.outcome is not Outcome.REJECTED and rest[-1]:  # answered trailers too
            self.req_phase = Phase.DONE
        return out

    def _answer_body(
        self,
        request: RoutingRequest,
        strategy: Strategy,
        parsed: InferenceRequest,
        body: bytes,
        complete: bool,
        body_end: bool,
        then: list[ext.ProcessingResponse],
    ) -> list[ext.ProcessingResponse]:
        try:
            self._admit(request, strategy, parsed.user)
        except GatewayError as error:
            return [self._reject(error)]
        return self._answer_when_admitted(
            partial(self._answer_routed_body, parsed, body, complete, body_end, then)
        )

    def _answer_routed_body(
        self, parsed: InferenceRequest, body: bytes, complete: bool, body_end: bool, then: Answers
    ) -> Answers:
        # Trailers answered too (`then`): nothing of the request is left to come.
        self.req_phase = Phase.DONE if body_end or then else Phase.PASSTHROUGH
        headers = self._route_headers()
        # Only a whole body can be rewritten: to name an alias's target, and to ask the
        # engine for the streamed usage chunk so tokens can be counted.
        new_body = None
        wants_usage = parsed.stream and not parsed.include_usage and self._api.usage_on_request
        inject = complete and wants_usage and self._cfg.inject_include_usage
        rename = self._model if self._alias and complete else ""
        if inject or rename:
            new_body = rewrite_body(body, model=rename, include_usage=inject)
            if new_body is not None:
                headers.append(("content-length", str(len(new_body))))
        if self.req_mode == FULL_DUPLEX:
            return [
                responses.routed_request_headers(
                    headers, self._decision_destination(), self._handoff(), self._flow_fields()
                ),
                *responses.streamed_bodies(new_body or body, body_end, response=False),
                *then,
            ]
        return [
            responses.routed_request_body(
                headers,
                self._decision_destination(),
                new_body,
                self._handoff(),
                self._flow_fields(),
            ),
            *then,
        ]

    def _pass_request_chunk(self, body: ext.HttpBody) -> list[ext.ProcessingResponse]:
        if self.req_mode == FULL_DUPLEX:
            return responses.streamed_bodies(body.body, body.end_of_stream, response=False)
        return [responses.CONTINUE_REQUEST_BODY]

    # -- routing ------------------------------------------------------------------------

    def _model_from_header(self, header_only: bool) -> str:
        model = self._headers.get(names.MODEL_HEADER, "").strip()
        if len(model) > MAX_MODEL_NAME:  # as for the body's `model`: never echoed whole
            raise errors.model_required(
                f"the {names.MODEL_HEADER} header is longer than {MAX_MODEL_NAME} characters"
            )
        if model:
            return model
        if header_only:
            raise errors.model_required(
                "the request has no body; send a JSON body naming `model` "
                f"(or the {names.MODEL_HEADER} header)"
            )
        raise errors.model_required(
            f"request body mode {MODE_NAMES.get(self.req_mode, self.req_mode)} routes before "
            f"the body is read; send the {names.MODEL_HEADER} header"
        )

    def _screen_headers(self) -> GatewayError | None:
        """Apply the header policy (who may set priority, strategy...); the client's
        error when it sent a header it must not."""
        if self._flow is None:
            return None
        try:
            self._flow.screen_headers(self._headers)
        except GatewayError as error:
            return error
        return None

    def _admit(self, request: RoutingRequest, strategy: Strategy, body_user: str = "") -> None:
        """Route now, or leave `_admission` for the service to await (flow control)."""
        if self._flow is None:
            self._route_request(request, strategy)
            return
        self._flow_key = self._flow.flow_key(self._headers, body_user)
        flow_request = FlowRequest(request.model, self._flow_key, self._subset)
        route = partial(self._route_request, request, strategy)
        self._admission = self._flow.admit(flow_request, route)

    def _answer_when_admitted(self, answer: Callable[[], Answers]) -> Answers:
        """`answer()` now if the request was routed, else nothing until admitted."""
        if self._admission is None:
            return answer()
        self._answer = answer
        self._waiting_since = time.monotonic()
        return []

    def _answer_routed_headers(self) -> Answers:
        if self.req_phase is Phase.BODY:
            self.req_phase = Phase.PASSTHROUGH
        return [self._routed_headers_response()]

    def _flow_fields(self) -> dict[str, str | int] | None:
        if self._flow is None or not self._flow.write_metadata:
            return None
        return {"fairness_id": self._flow_key.fairness_id, "priority": self._flow_key.priority}

    def _routing_request(
        self, model: str, prompt: str, document: dict[str, Any] | None, endpoint: str
    ) -> RoutingRequest:
        self._model = model
        alias = self._router.registry.aliases.get(model)
        if alias is not None:
            # Routed (and its body rewritten) as the target; 404 if no target exists.
            model = self._model = alias.pick(self._router.registry)
            self._alias = alias.name
            telemetry.ALIAS_REQUESTS.labels(alias.name, model).inc()
        return RoutingRequest(
            model=model,
            request_id=self._request_id,
            prompt=prompt,
            session_id=self._headers.get(names.SESSION_ID_HEADER, ""),
            user=self._headers.get(names.USER_HEADER, ""),
            document=document,
            endpoint=endpoint,
        )

    def _route_request(self, request: RoutingRequest, strategy: Strategy) -> None:
        self._decision = self._router.route(request, strategy, self._subset)
        self._routed_at = time.monotonic()

    def _handoff(self) -> dict[str, str] | None:
        """What the routing answer writes for the observer stream (two-filter shape)."""
        if not self._handoff_key or self._decision is None:
            return None
        return {
            names.HANDOFF_KEY_FIELD: self._handoff_key,
            "model": self._model,
            "pod": self._decision.pod.key,
            "strategy": self._decision.strategy,
            "request_id": self._request_id,
            "started_at": repr(time.time() - (time.monotonic() - self._started)),
            "api": self._api.name,
            "flow_fairness_id": self._flow_key.fairness_id,
            "flow_priority": str(self._flow_key.priority),
        }

    def _decision_destination(self) -> str:
        assert self._decision is not None
        return self._decision.destination

    def _route_headers(self) -> list[tuple[str, str]]:
        assert self._decision is not None
        destination = self._decision.destination
        headers = [
            (names.DESTINATION_HEADER, destination),
            (self._cfg.target_pod_header, self._decision.pod.address),
        ]
        if self._request_id_generated:
            headers.append((names.REQUEST_ID_HEADER, self._request_id))
        if self._span is not None:
            headers.append((names.TRACEPARENT_HEADER, self._span.traceparent))
        return headers

    def _routed_headers_response(self) -> ext.ProcessingResponse:
        return responses.routed_request_headers(
            self._route_headers(),
            self._decision_destination(),
            self._handoff(),
            self._flow_fields(),
        )

    def _answer_models(self, model_id: str) -> ext.ProcessingResponse:
        """`GET /v1/models` (model_id ""), `GET /v1/models/{id}`, or HEAD of either.
        A HEAD answer carries the GET body too: Envoy sends a local reply to a HEAD
        request without its body, so the client sees GET's status and headers only."""
        self._model = ""
        registry = self._router.registry
        if not model_id:
            body = models_list_body(registry, ModelState.READY)
        else:
            found = model_body(registry, model_id, ModelState.READY)
            if found is None:
                return self._reject(errors.model_not_found(model_id))
            body = found
        self._status = 200
        out = responses.json_answer(200, body, self._request_id)
        self._finish(Outcome.REJECTED)  # answered by the processor itself
        return out

    def _reject(self, error: GatewayError) -> ext.ProcessingResponse:
        self._status = error.status
        self._error_code = error.code
        out = responses.rejection(
            error, self._request_id or uuid.uuid4().hex, self._api.error_body(error)
        )
        log.info(
            "request_rejected",
            request_id=self._request_id,
            model=self._model,
            status=error.status,
            code=error.code,
            reason=error.message,
        )
        self._finish(Outcome.REJECTED)
        return out

    # -- response path ------------------------------------------------------------------

    def _on_response_headers(self, frame: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        if self.resp_phase is not Phase.HEADERS:
            return self._noop("response_headers", "duplicate response headers")
        message = frame.response_headers
        headers = names.header_dict(message)
        status = headers.get(":status", "0")
        self._start_response(
            frame, int(status) if status.isdigit() else 0, headers.get("content-type", "")
        )
        self._details = names.response_details(frame)
        if message.end_of_stream:
            self._end_response(time.monotonic())
        if self._cfg.conformance_mode and self._decision is not None:
            served = self._served or "fail: missing destination endpoint served metadata"
            return [responses.response_headers_set([(names.CONFORMANCE_SERVED_HEADER, served)])]
        return [responses.CONTINUE_RESPONSE_HEADERS]

    def _on_response_body(self, frame: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        if self.resp_phase is Phase.HEADERS:
            # Envoy skips the response headers phase (envoy/envoy.yaml's observer filter
            # does: nothing in them needs an answer): the status comes as an attribute of
            # the first body frame, and accounting tells JSON from SSE by the body itself.
            self._start_response(frame, names.response_status(frame), content_type="")
            self._details = names.response_details(frame)
        if self.resp_phase is not Phase.BODY:
            return self._noop("response_body", "response body after end of stream")
        body = frame.response_body
        now = time.monotonic()
        if self._accounting is not None and body.body:
            self._accounting.on_chunk(body.body, now)
        if self.resp_mode == FULL_DUPLEX:
            out = responses.streamed_bodies(body.body, body.end_of_stream, response=True)
        else:
            out = [responses.CONTINUE_RESPONSE_BODY]
        if body.end_of_stream:
            self._end_response(now)
            tokens = self._token_fields()
            if tokens and out:
                out[-1] = responses.with_flow_metadata(out[-1], tokens)
        return out

    def _token_fields(self) -> dict[str, str | int] | None:
        """The response's token counts for Envoy (--flow-metadata), once usage is known."""
        usage = self._accounting.usage if self._accounting is not None else None
        if usage is None or self._flow is None or not self._flow.write_metadata:
            return None
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }

    def _start_response(self, frame: ext.ProcessingRequest, status: int, content_type: str) -> None:
        self._status = status
        if self._decision is not None:
            self._served = names.served_endpoint(frame)
            self._accounting = ResponseAccounting(self._started, self._api.reader())
            self._accounting.on_headers(content_type)
        self.resp_phase = Phase.BODY

    def _on_response_trailers(self) -> list[ext.ProcessingResponse]:
        if self.resp_phase is Phase.DONE:
            return self._noop("response_trailers", "response trailers after end of stream")
        self._end_response(time.monotonic())
        return [responses.CONTINUE_RESPONSE_TRAILERS]

    def _end_response(self, now: float) -> None:
        self.resp_phase = Phase.DONE
        if self._accounting is not None:
            self._accounting.on_end(now)
        self._finish(Outcome.FINISHED)

    def _served_pod_key(self) -> str:
        """The pod that gets the accounting: the one Envoy says served, else the pick."""
        assert self._decision is not None
        if self._served and self._served != self._decision.pod.address:
            for pod in self._router.registry.lookup(self._model).pods:
                if pod.address == self._served:
                    return pod.key
        return self._decision.pod.key

    # -- shared -------------------------------------------------------------------------

    def _configure(self, frame: ext.ProcessingRequest) -> None:
        self._configured = True
        if frame.HasField("protocol_config"):
            config = frame.protocol_config
            self.req_mode = config.request_body_mode
            self.resp_mode = config.response_body_mode

    def _noop(self, kind: str, why: str) -> list[ext.ProcessingResponse]:
        log.debug("frame_ignored", kind=kind, why=why, request_id=self._request_id)
        is_request = kind.startswith("request")
        mode = self.req_mode if is_request else self.resp_mode
        if mode == FULL_DUPLEX and kind.endswith("_body"):
            return []
        return [responses.CONTINUE_BY_FRAME[kind]]

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._decision is not None and self._holds_inflight:
            self._router.release(self._decision)
        known = self._router.registry.lookup(self._model).state is not ModelState.ABSENT
        model_label = self._model if known else telemetry.UNKNOWN_MODEL_LABEL
        status = CANCELLED_STATUS if outcome is Outcome.CANCELLED else self._status
        code = self._error_code or _OUTCOME_CODES.get(outcome, "")
        telemetry.child(telemetry.REQUESTS, model_label, str(status), code).inc()
        if self._span is not None:
            self._end_span(code, status)
        if outcome is Outcome.REJECTED:
            return  # logged once in _reject (or an answer of the processor's own)
        now = time.monotonic()
        pod = self._served_pod_key() if self._decision is not None else ""
        # A pod deleted while its response finished has had its series dropped (and its
        # health forgotten): recording now would bring them back for good.
        pod_known = bool(pod) and self._router.registry.pod(pod) is not None
        if pod_known and outcome is Outcome.FINISHED:
            self._router.health.record(pod, *verdict(self._status, self._details))
        accounting = self._accounting
        if accounting is not None and outcome is Outcome.FINISHED:
            accounting.record(model_label, pod if pod_known else "", now)
            if self._flow is not None and accounting.usage is not None:
                self._flow.record_usage(self._flow_key, accounting.usage)
            if pod_known and 200 <= self._status < 300:
                # Errors end fast and say nothing about the pod's speed.
                self._router.observed(
                    ResponseTiming(
                        pod,
                        self._request_id,
                        accounting.ttft(),
                        accounting.inter_token_latency(),
                        now - self._started,
                    )
                )
        if not self._cfg.access_log:
            return
        # A cancelled request also says what the engine (or Envoy) had answered so far.
        cancelled = {"response_status": self._status} if outcome is Outcome.CANCELLED else {}
        alias = {"alias": self._alias} if self._alias else {}  # the model asked for
        ttft = accounting.ttft() if accounting is not None else None
        usage = accounting.usage if accounting is not None else None
        log.info(
            f"request_{outcome}",
            request_id=self._request_id,
            model=self._model,
            pod=pod,
            strategy=self._decision.strategy if self._decision else "",
            status=status,
            duration_ms=round((now - self._started) * 1000, 3),
            routing_ms=round((self._routed_at - self._started) * 1000, 3)
            if self._routed_at
            else None,
            first_token_ms=round(ttft * 1000, 3) if ttft is not None else None,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            **cancelled,
            **alias,
        )

    def _end_span(self, code: str, status: int) -> None:
        """The request's span, with the routing decision and what came of it."""
        assert self._span is not None
        decision = self._decision
        accounting = self._accounting
        usage = accounting.usage if accounting is not None else None
        ttft = accounting.ttft() if accounting is not None else None
        self._span.end(
            {
                "gateway.request_id": self._request_id,
                "gateway.api": self._api.name,
                "http.request.method": self._method,
                "url.path": self._path,
                "http.response.status_code": status or None,
                "gen_ai.request.model": self._alias or self._model or None,
                "gateway.model": self._model or None,
                "gateway.alias": self._alias or None,
                "gateway.strategy": decision.strategy if decision else None,
                "gateway.pod": decision.pod.key if decision else None,
                "gateway.pod.address": decision.pod.address if decision else None,
                "gateway.served_pod": self._served_pod_key() if decision else None,
                "gateway.routing_ms": (self._routed_at - self._started) * 1000
                if self._routed_at
                else None,
                "gateway.queue_wait_ms": self._queue_wait * 1000 if self._queue_wait else None,
                "gateway.first_token_ms": ttft * 1000 if ttft is not None else None,
                "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else None,
                "gen_ai.usage.output_tokens": usage.completion_tokens if usage else None,
                "gateway.error_code": code or None,
            },
            error=code,
        )
