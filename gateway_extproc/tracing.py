"""Request tracing: W3C trace context in and out, and one OpenTelemetry span per request
exported over OTLP/gRPC, when `--otlp-endpoint` is set.

The span is a child of the client's `traceparent` (a root when there is none) and the
request goes upstream with a `traceparent` naming the span as parent, so the engine's
own spans hang below the gateway's decision. Sampling follows the client's flag and,
for new traces, `--trace-sample-ratio`; a span that is not sampled is still propagated.

Off (the default) nothing here runs: the OpenTelemetry SDK is imported only when a
`Tracer` is made, and the session's only cost is testing that it has none. The client's
own `traceparent` then reaches the engine untouched, as every other header does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SERVICE_NAME = "gateway-extproc"
SPAN_NAME = "gateway.route"
# The exporter gives up on a batch after this long (a collector that is away must not
# hold the processor's shutdown for the SDK's default of 10 s per attempt).
EXPORT_TIMEOUT_S = 5.0

AttributeValue = str | int | float | bool


class RequestSpan:
    """One request's span: started when its headers arrive, ended when it is done."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, span: Any, traceparent: str) -> None:
        self._span = span
        self.traceparent = traceparent  # what the request carries upstream

    def end(self, attributes: Mapping[str, AttributeValue | None], error: str = "") -> None:
        span = self._span
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


class Tracer:
    def __init__(
        self, endpoint: str, *, sample_ratio: float = 1.0, service_name: str = SERVICE_NAME
    ) -> None:
        """`endpoint` as config.otlp_endpoint accepts it: `[http[s]://]host:port`."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            insecure=not endpoint.startswith("https://"),
            timeout=EXPORT_TIMEOUT_S,
        )
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        # Spans are exported in batches from the SDK's own thread, off the event loop.
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("gateway_extproc")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        self._in_context = set_span_in_context
        self.endpoint = endpoint

    def start(self, headers: Mapping[str, str]) -> RequestSpan:
        """A span for the request with these headers, below the client's traceparent."""
        parent = self._propagator.extract(headers)
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._kind)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._in_context(span))
        return RequestSpan(span, carrier.get("traceparent", ""))

    def shutdown(self) -> None:
        """Export what is pending and stop (blocking: run it off the event loop)."""
        self._provider.shutdown()
