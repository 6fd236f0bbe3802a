"""The ExternalProcessor gRPC servicer: one coroutine per Envoy stream.

It owns nothing but the loop: frames go into a Session, the Session's responses go
back. Whatever happens (Envoy cancels the stream, the client goes away, a bug) the
session is closed exactly once, and no Python traceback reaches Envoy or the client.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc import telemetry
from gateway_extproc.conformance.recording import StreamRecorder, save
from gateway_extproc.extproc.session import Outcome, Session, SessionConfig
from gateway_extproc.routing.router import Router

log = structlog.get_logger("gateway_extproc.service")


class ExternalProcessor(ext_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router, config: SessionConfig, record_dir: str = "") -> None:
        self._router = router
        self._config = config
        self._record_dir = Path(record_dir) if record_dir else None
        self._stream_numbers = itertools.count(1)
        self.open_streams = 0

    async def Process(  # the gRPC method name, as Envoy calls it
        self,
        request_iterator: AsyncIterator[ext.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext.ProcessingResponse]:
        session = Session(self._router, self._config)
        recorder = self._recorder()
        self.open_streams += 1
        try:
            async for frame in request_iterator:
                responses = session.handle(frame)
                if recorder is not None:
                    recorder.add(frame, responses, session.model)
                if frame.observability_mode:
                    continue  # Envoy expects no answer in observability mode
                for response in responses:
                    yield response
        except asyncio.CancelledError:
            raise  # Envoy cancelled the stream; the session is closed as aborted below
        except Exception:
            telemetry.FILTER_ERRORS.inc()
            log.exception("stream_failed", outcome=str(session.outcome))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in gateway-extproc")
        finally:
            self.open_streams -= 1
            # A stream that ends before the response is complete was cut short. (How it
            # ends is no guide: Envoy half-closes and resets every stream at once.)
            cut_short = session.outcome is None
            session.close(Outcome.ABORTED)
            if recorder is not None:
                self._write(recorder, cut_short)

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
