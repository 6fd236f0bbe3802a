"""Builders for ext_proc frames as Envoy sends them, for tests that feed sessions."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf import struct_pb2

Mode = processing_mode_pb2.ProcessingMode


def protocol(request_mode: int = Mode.BUFFERED, response_mode: int = Mode.STREAMED):
    return ext.ProtocolConfiguration(
        request_body_mode=request_mode, response_body_mode=response_mode
    )


def request_headers(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    *,
    end_of_stream: bool = False,
    headers: dict[str, str] | None = None,
    config: ext.ProtocolConfiguration | None = None,
    subset: list[str] | str | None = None,
) -> ext.ProcessingRequest:
    values = {
        ":path": path,
        ":method": method,
        ":authority": "localhost",
        "content-type": "application/json",
        **(headers or {}),
    }
    frame = ext.ProcessingRequest(
        request_headers=ext.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()
                ]
            ),
            end_of_stream=end_of_stream,
        ),
        protocol_config=config if config is not None else protocol(),
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        if isinstance(subset, str):
            hint["x-gateway-destination-endpoint-subset"] = subset
        else:
            hint.get_or_create_list("x-gateway-destination-endpoint-subset").extend(subset)
        frame.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return frame


def request_body(body: bytes, end_of_stream: bool = True) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(request_body=ext.HttpBody(body=body, end_of_stream=end_of_stream))


def request_trailers() -> ext.ProcessingRequest:
    return ext.ProcessingRequest(request_trailers=ext.HttpTrailers())


def response_headers(status: int = 200, *, end_of_stream: bool = False) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(
        response_headers=ext.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
            ),
            end_of_stream=end_of_stream,
        )
    )


def response_body(body: bytes, end_of_stream: bool = False) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(response_body=ext.HttpBody(body=body, end_of_stream=end_of_stream))


def response_trailers() -> ext.ProcessingRequest:
    return ext.ProcessingRequest(response_trailers=ext.HttpTrailers())


def set_headers(response: ext.ProcessingResponse) -> dict[str, str]:
    """Headers a response sets, whatever phase it answers."""
    kind = response.WhichOneof("response")
    if kind == "immediate_response":
        mutation = response.immediate_response.headers
    else:
        mutation = getattr(response, kind).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
