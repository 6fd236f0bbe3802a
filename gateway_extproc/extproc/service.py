"""The ExternalProcessor gRPC servicer: one coroutine per Envoy stream.

It owns nothing but the loop: frames go into a Session, the Session's responses go
back. Whatever happens (Envoy cancels the stream, the client goes away, a bug) the
session is closed exactly once, and no Python traceback reaches Envoy or the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc import telemetry
from gateway_extproc.extproc.session import Outcome, Session, SessionConfig
from gateway_extproc.routing.router import Router

log = structlog.get_logger("gateway_extproc.service")


class ExternalProcessor(ext_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router, config: SessionConfig) -> None:
        self._router = router
        self._config = config
        self.open_streams = 0

    async def Process(
        self,
        request_iterator: AsyncIterator[ext.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext.ProcessingResponse]:
        session = Session(self._router, self._config)
        self.open_streams += 1
        try:
            async for frame in request_iterator:
                responses = session.handle(frame)
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
            # A stream that ends before the response is complete was cut short.
            session.close(Outcome.ABORTED)
