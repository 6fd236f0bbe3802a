"""The ExternalProcessor gRPC servicer: one coroutine per Envoy stream.

It owns nothing but the loop: frames go into a Session, the Session's responses go
back. A routing-role stream parks its routed session for the observer-role stream that
claims it (extproc/handoff.py); any other stream keeps its session to the end. Whatever
happens (Envoy cancels the stream, the client goes away, a bug) the session is closed
exactly once, and no Python traceback reaches Envoy or the client.

A request that flow control holds (flowcontrol/controller.py) is awaited here, between
the frame that asked for a decision and its answer: the stream is simply not answered
yet, and Envoy is asked to extend its per-message timeout to cover the wait. If the
client leaves meanwhile, Envoy resets the stream, this coroutine is cancelled, and
closing the session takes the request out of the queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf.message import DecodeError

from gateway_extproc import telemetry
from gateway_extproc.extproc import responses
from gateway_extproc.extproc.envoy_names import (
    OBSERVE_ROLE,
    ROLE_METADATA,
    ROUTE_ROLE,
    handoff_context,
)
from gateway_extproc.extproc.envoy_names import handoff_key as handoff_key_of
from gateway_extproc.extproc.handoff import Handoff
from gateway_extproc.extproc.recorder import StreamRecorder, save
from gateway_extproc.extproc.session import FULL_DUPLEX, Outcome, Session, SessionConfig
from gateway_extproc.flowcontrol.controller import FlowController
from gateway_extproc.routing.router import Router

log = structlog.get_logger("gateway_extproc.service")

# Asked of Envoy beyond the longest hold: the dispatch and answer after it.
HOLD_MARGIN_S = 2.0


class ExternalProcessor(ext_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        router: Router,
        config: SessionConfig,
        record_dir: str = "",
        flow: FlowController | None = None,
    ) -> None:
        self._router = router
        self._config = config
        self._flow = flow
        self._record_dir = Path(record_dir) if record_dir else None
        self._stream_numbers = itertools.count(1)
        self.handoff = Handoff()
        self.open_streams = 0

    async def Process(  # the gRPC method name, as Envoy calls it
        self,
        request_iterator: AsyncIterator[ext.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext.ProcessingResponse]:
        role = _role(context)
        if role == OBSERVE_ROLE:
            session = None  # claimed from the routing stream by the first frame
            handoff_key = ""
        else:
            handoff_key = self.handoff.new_key() if role == ROUTE_ROLE else ""
            session = Session(self._router, self._config, handoff_key, self._flow)
        looked_up = False  # observer: the first frame has claimed the session (or not)
        parked = False  # routing stream: the session went to the handoff table
        handed_over = False  # routing stream: routed, and ended by us, not cut by Envoy
        broken = False  # the stream failed on our side, not because the client left
        # Until a frame has been read nothing was requested: a stream that ends before
        # (a message that is not a ProcessingRequest, or one over the size limit) is not
        # counted or logged as a request, so a peer sending garbage cannot fill the
        # access log.
        read_one = False
        recorder = self._recorder()
        self.open_streams += 1
        try:
            async for frame in request_iterator:
                read_one = True
                if role == OBSERVE_ROLE:
                    if not looked_up:
                        looked_up = True
                        key = handoff_key_of(frame)
                        session = self.handoff.claim(key)
                        if session is None and not self.handoff.refuses(key):
                            # Routed by another process (or no key at all).
                            session = self._routed_elsewhere(frame)
                    answers = _observe(session, frame)
                else:
                    assert session is not None
                    answers = session.handle(frame)
                    if session.preparing is not None:
                        # The prompt is being tokenized off the loop; other streams go on.
                        await asyncio.wait((session.preparing,))
                        answers = session.resume()
                    admission = session.admission
                    if admission is not None:
                        # Envoy times no answer in full duplex: nothing to extend there.
                        if not frame.observability_mode and session.req_mode != FULL_DUPLEX:
                            yield self._hold_notice()
                        await admission.wait()
                        answers = session.after_admission()
                    if handoff_key and session.awaiting_response and not parked:
                        # Parked before the routing answer leaves, so the observer
                        # cannot ask for it first.
                        parked = True
                        self.handoff.park(handoff_key, session)
                if recorder is not None:
                    recorder.add(frame, answers, session.model if session else "")
                # The observer stream's work is done with the response's last frame: end
                # it (status OK) now rather than wait for Envoy to reset it. A stream the
                # client cancels while the handler awaits its next frame leaks about
                # 180 bytes of native memory in grpcio (grpc/grpc#43360): one per
                # request, the RSS growth the soak measured (docs/BENCHMARKS.md).
                ends_response = role == OBSERVE_ROLE and _response_ended(frame)
                if frame.observability_mode:
                    if ends_response:
                        return
                    continue  # Envoy expects no answer in observability mode
                for answer in answers:
                    yield answer
                if ends_response:
                    return
                if parked and session is not None and session.request_answered:
                    # The routing stream's work is done: end it (status OK) rather than
                    # let it live as long as the response. Envoy then goes on without
                    # the processor, so a processor that dies or restarts from here on
                    # cuts nothing; the fail-open observer stream carries the response.
                    handed_over = True
                    return
        except asyncio.CancelledError:
            raise  # Envoy cancelled the stream; the session is closed as cancelled below
        except DecodeError as exc:
            # Not Envoy, or not a ProcessingRequest: the peer's fault, said in one line.
            broken = True
            telemetry.MALFORMED_MESSAGES.inc()
            held_back = _LOG_LIMIT.allow("malformed_message")
            if held_back is not None:
                log.warning(
                    "malformed_message",
                    peer=context.peer(),
                    problem=_one_line(exc),
                    held_back=held_back,
                )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a ProcessingRequest")
        except Exception as exc:
            broken = True
            telemetry.FILTER_ERRORS.inc()
            held_back = _LOG_LIMIT.allow(f"stream_failed:{type(exc).__name__}")
            if held_back is not None:
                # One line where the error arose; the whole traceback at debug level.
                log.error(
                    "stream_failed",
                    outcome=str(session.outcome if session else None),
                    problem=_one_line(exc),
                    at=_where(exc),
                    held_back=held_back,
                    exc_info=logging.getLogger().isEnabledFor(logging.DEBUG),
                )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in gateway-extproc")
        finally:
            self.open_streams -= 1
            # A stream that ends before the response is complete was cut short: the
            # client left. (How it ends is no guide: Envoy half-closes and resets every
            # stream at once.) A routing stream whose session was parked has handed it
            # over: the observer stream ends it, or the handoff table once it is clear
            # that no observer stream will come (at once when Envoy cut the stream before
            # the processor ended it: the client left while it was being routed).
            cut_short = session is not None and session.outcome is None and not parked
            if session is not None and not parked and read_one:
                session.close(Outcome.ABORTED if broken else Outcome.CANCELLED)
            if parked and not handed_over:
                self.handoff.routing_ended(handoff_key)
            if recorder is not None:
                self._write(recorder, cut_short)

    def _hold_notice(self) -> ext.ProcessingResponse:
        assert self._flow is not None
        return responses.extend_message_timeout(self._flow.max_hold + HOLD_MARGIN_S)

    def _routed_elsewhere(self, frame: ext.ProcessingRequest) -> Session | None:
        context = handoff_context(frame)
        if context is None:
            return None
        self.handoff.observed_foreign()
        return Session.observing(self._router, self._config, context, self._flow)

    def _recorder(self) -> StreamRecorder | None:
        if self._record_dir is None:
            return None
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{next(self._stream_numbers):06d}"
        return StreamRecorder(name, self._config.target_pod_header)

    def _write(self, recorder: StreamRecorder, cancelled: bool) -> None:
        # Written in place (a few KiB): recording is a capture tool, not the serving mode.
        assert self._record_dir is not None
        recording = recorder.finish(cancelled)
        path = self._record_dir / f"{recording.name}.json"
        try:
            save(recording, path)
        except OSError as exc:
            log.warning("recording_not_written", path=str(path), problem=str(exc))


# Errors a peer can cause on every stream it opens: logged at most once per kind per
# interval, with the count held back since.
_LOG_LIMIT = telemetry.LogLimit(every=10.0)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _where(exc: BaseException) -> str:
    """file:line (function) of the innermost frame of the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} ({last.name})"


_RESPONSE_KINDS = frozenset({"response_headers", "response_body", "response_trailers"})


def _observe(session: Session | None, frame: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
    """An observer stream's frame: only the response matters (the request was handled on
    the routing stream). The answers matter only if Envoy is not in observability mode."""
    kind = frame.WhichOneof("request")
    if session is not None and kind in _RESPONSE_KINDS:
        return session.handle(frame)
    return [responses.CONTINUE_BY_FRAME[kind]] if kind is not None else []


def _response_ended(frame: ext.ProcessingRequest) -> bool:
    """The response's last frame: its trailers, or a body frame that ends the stream."""
    kind = frame.WhichOneof("request")
    if kind == "response_trailers":
        return True
    return kind == "response_body" and frame.response_body.end_of_stream


def _role(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ROLE_METADATA:
            return value if isinstance(value, str) else value.decode()
    return ""
