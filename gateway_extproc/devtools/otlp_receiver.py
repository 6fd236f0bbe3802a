"""A small OTLP/gRPC trace receiver: what a collector does with spans, minus the rest.

For the tests, the benchmark and anyone trying `--otlp-endpoint` without a collector:
it serves the OpenTelemetry `TraceService/Export` method (the generated code of the
opentelemetry-proto package) on a loopback port and keeps every span it is sent, with
its attributes decoded, until asked. Never used by the processor itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex, as in a traceparent header
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0  # 0 unset, 1 ok, 2 error (opentelemetry.proto.trace.v1.Status)
    status_message: str = ""


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind is not None else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        self._receiver._add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` listens on `receiver.endpoint` meanwhile."""

    def __init__(self, host: str = LOCALHOST, port: int = 0) -> None:
        # No SO_REUSEPORT (grpc's default): a second receiver on a taken port must fail,
        # not share the port and get half the spans.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc's way of saying the bind failed
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(
        self, match: Callable[[ReceivedSpan], bool], timeout: float = 10.0
    ) -> ReceivedSpan | None:
        """The first span received that `match`es, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for span in self._spans:
                    if match(span):
                        return span
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway_extproc.devtools.otlp_receiver [--host H] [--port P]`: receive
    until SIGINT/SIGTERM, then say how many spans came."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        receiver = OtlpReceiver(args.host, args.port)
    except OSError as exc:
        print(f"otlp_receiver: {exc}", file=sys.stderr)
        return 1
    with receiver:
        print(f"receiving OTLP/gRPC spans on {receiver.endpoint}", flush=True)
        stop.wait()
        print(f"received {len(receiver.spans())} spans", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
