"""Builders for ProcessingResponse messages.

The empty CONTINUE answers are built once: they are most of what the processor sends,
and gRPC only serialises them, so sharing the objects across streams is safe.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from gateway_extproc.errors import GatewayError
from gateway_extproc.extproc.envoy_names import (
    DESTINATION_HEADER,
    HANDOFF_NAMESPACE,
    LB_METADATA_NAMESPACE,
    REQUEST_ID_HEADER,
)
from gateway_extproc.openai.errors import body_of

# Envoy splits what it sends upstream at this size in FULL_DUPLEX_STREAMED; the Gateway
# API Inference Extension protocol asks for chunks under 64 KiB.
STREAMED_CHUNK_BYTES = 62 * 1024

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

CONTINUE_REQUEST_HEADERS = ext.ProcessingResponse(request_headers=ext.HeadersResponse())
CONTINUE_RESPONSE_HEADERS = ext.ProcessingResponse(response_headers=ext.HeadersResponse())
CONTINUE_REQUEST_BODY = ext.ProcessingResponse(request_body=ext.BodyResponse())
CONTINUE_RESPONSE_BODY = ext.ProcessingResponse(response_body=ext.BodyResponse())
CONTINUE_REQUEST_TRAILERS = ext.ProcessingResponse(request_trailers=ext.TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = ext.ProcessingResponse(response_trailers=ext.TrailersResponse())

CONTINUE_BY_FRAME = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "response_body": CONTINUE_RESPONSE_BODY,
    "request_trailers": CONTINUE_REQUEST_TRAILERS,
    "response_trailers": CONTINUE_RESPONSE_TRAILERS,
}


def header_value(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
        append_action=_OVERWRITE,
    )


def routed_common(headers: Iterable[tuple[str, str]]) -> ext.CommonResponse:
    """A CONTINUE that sets `headers` and makes Envoy pick the route (and host) again."""
    return ext.CommonResponse(
        header_mutation=ext.HeaderMutation(
            set_headers=[header_value(name, value) for name, value in headers]
        ),
        clear_route_cache=True,
    )


# Flow-control fields written beside the handoff key (--flow-metadata), for Envoy's own
# rate limiting: `fairness_id` and `priority` with the routing answer, the response's
# token counts with its last body answer (see docs/protocol.md).
FlowFields = Mapping[str, str | int]


def destination_metadata(
    destination: str, handoff: Mapping[str, str] | None = None, flow: FlowFields | None = None
) -> struct_pb2.Struct:
    """`envoy.lb` with the pick, and (two-filter shape) the handoff key and context, and
    the flow-control fields."""
    metadata = struct_pb2.Struct()
    metadata.get_or_create_struct(LB_METADATA_NAMESPACE)[DESTINATION_HEADER] = destination
    if handoff:
        metadata.get_or_create_struct(HANDOFF_NAMESPACE).update(handoff)
    if flow:
        metadata.get_or_create_struct(HANDOFF_NAMESPACE).update(flow)
    return metadata


def response_headers_set(headers: Iterable[tuple[str, str]]) -> ext.ProcessingResponse:
    """The answer to the response headers that sets `headers` on the client's response."""
    return ext.ProcessingResponse(
        response_headers=ext.HeadersResponse(
            response=ext.CommonResponse(
                header_mutation=ext.HeaderMutation(
                    set_headers=[header_value(name, value) for name, value in headers]
                )
            )
        )
    )


def routed_request_headers(
    headers: Iterable[tuple[str, str]],
    destination: str,
    handoff: Mapping[str, str] | None = None,
    flow: FlowFields | None = None,
) -> ext.ProcessingResponse:
    return _with_handoff(
        _routed_bytes("request_headers", tuple(headers), destination), handoff, flow
    )


def routed_request_body(
    headers: Iterable[tuple[str, str]],
    destination: str,
    new_body: bytes | None = None,
    handoff: Mapping[str, str] | None = None,
    flow: FlowFields | None = None,
) -> ext.ProcessingResponse:
    if new_body is None:
        routed = _routed_bytes("request_body", tuple(headers), destination)
        return _with_handoff(routed, handoff, flow)
    common = routed_common(headers)
    common.body_mutation.body = new_body
    return ext.ProcessingResponse(
        request_body=ext.BodyResponse(response=common),
        dynamic_metadata=destination_metadata(destination, handoff, flow),
    )


def with_flow_metadata(answer: ext.ProcessingResponse, flow: FlowFields) -> ext.ProcessingResponse:
    """`answer` (copied if it is a shared CONTINUE) also carrying `flow` fields."""
    out = ext.ProcessingResponse()
    out.CopyFrom(answer)
    out.dynamic_metadata.get_or_create_struct(HANDOFF_NAMESPACE).update(flow)
    return out


def extend_message_timeout(seconds: float) -> ext.ProcessingResponse:
    """Ask Envoy to wait up to `seconds` for the answer to the frame it sent last (the
    request is held by flow control). Envoy honours it when its ext_proc filter sets
    `max_message_timeout` at least this long, once per frame; it is not an answer."""
    out = ext.ProcessingResponse()
    out.override_message_timeout.FromMilliseconds(round(seconds * 1000))
    return out


# Building the routing answer message by message costs about 15 us per request; the
# part that depends only on the headers set and the destination is built once per pod
# (and request id, when the processor makes one up) and kept serialized.
@functools.lru_cache(maxsize=4096)
def _routed_bytes(phase: str, headers: tuple[tuple[str, str], ...], destination: str) -> bytes:
    common = routed_common(headers)
    if phase == "request_headers":
        answer = ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common))
    else:
        answer = ext.ProcessingResponse(request_body=ext.BodyResponse(response=common))
    answer.dynamic_metadata.CopyFrom(destination_metadata(destination))
    return answer.SerializeToString()


def _with_handoff(
    routed: bytes, handoff: Mapping[str, str] | None, flow: FlowFields | None = None
) -> ext.ProcessingResponse:
    """The cached answer with the handoff namespace (and flow fields) added: serialized
    protobuf messages concatenated parse as one merged message (the metadata maps join)."""
    if not handoff and not flow:
        return ext.ProcessingResponse.FromString(routed)
    extra = ext.ProcessingResponse()
    namespace = extra.dynamic_metadata.fields[HANDOFF_NAMESPACE].struct_value
    for name, value in (handoff or {}).items():
        namespace.fields[name].string_value = value
    if flow:
        namespace.update(flow)
    return ext.ProcessingResponse.FromString(routed + extra.SerializeToString())


def streamed_bodies(
    body: bytes, end_of_stream: bool, *, response: bool
) -> list[ext.ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: hand `body` back to Envoy in chunks under 64 KiB."""
    pieces = [body[i : i + STREAMED_CHUNK_BYTES] for i in range(0, len(body), STREAMED_CHUNK_BYTES)]
    if not pieces:
        pieces = [b""]
    out = []
    for index, piece in enumerate(pieces):
        last = end_of_stream and index == len(pieces) - 1
        mutation = ext.BodyMutation(
            streamed_response=ext.StreamedBodyResponse(body=piece, end_of_stream=last)
        )
        body_response = ext.BodyResponse(response=ext.CommonResponse(body_mutation=mutation))
        if response:
            out.append(ext.ProcessingResponse(response_body=body_response))
        else:
            out.append(ext.ProcessingResponse(request_body=body_response))
    return out


def immediate(
    status: int,
    body: bytes,
    *,
    headers: Iterable[tuple[str, str]] = (),
    details: str = "",
) -> ext.ProcessingResponse:
    return ext.ProcessingResponse(
        immediate_response=ext.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=ext.HeaderMutation(
                set_headers=[header_value(name, value) for name, value in headers]
            ),
            body=body,
            details=details,
        )
    )


def rejection(
    error: GatewayError, request_id: str, body: bytes | None = None
) -> ext.ProcessingResponse:
    """`error` answered to the client: `body` is its error body in the shape of the API
    the client called (apis/), OpenAI's when not given."""
    headers = [("content-type", "application/json"), (REQUEST_ID_HEADER, request_id)]
    if error.retry_after is not None:
        headers.append(("retry-after", str(error.retry_after)))
    headers.extend(error.headers)
    return immediate(
        error.status,
        body_of(error) if body is None else body,
        headers=headers,
        details=f"gateway_extproc_{error.code}",
    )


def json_answer(status: int, body: bytes, request_id: str) -> ext.ProcessingResponse:
    return immediate(
        status,
        body,
        headers=[("content-type", "application/json"), (REQUEST_ID_HEADER, request_id)],
    )
