"""Recordings: the format, and the recorder `serve --record-dir` turns a live stream
into one with. It lives on the serving side; conformance/replay.py only reads them.

A recording holds the frames Envoy sent and, for each, the expectations derived from
what the processor answered. Values that depend on the moment (which pod was picked, a
generated request id) are written as matches ("any pod of model M", "present"), so a
recording replays against any processor with the same model dictionary.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf import json_format, struct_pb2

from gateway_extproc.extproc.envoy_names import (
    DESTINATION_HEADER,
    LB_METADATA_NAMESPACE,
    REQUEST_ID_HEADER,
)
from gateway_extproc.proto_gen import recording_pb2 as rec

Recording = rec.Recording

# Headers whose value is a pod address chosen at the moment of the pick.
POD_HEADERS = frozenset({DESTINATION_HEADER, "target-pod"})
# Headers whose value is made up per request.
VOLATILE_HEADERS = frozenset({REQUEST_ID_HEADER})


def load(path: Path) -> rec.Recording:
    recording = json_format.Parse(path.read_text(encoding="utf-8"), rec.Recording())
    if not recording.name:
        recording.name = path.stem
    return recording


def dumps(recording: rec.Recording) -> str:
    # Sorted keys: two captures of the same exchange diff cleanly.
    return json_format.MessageToJson(recording, indent=2, sort_keys=True) + "\n"


def save(recording: rec.Recording, path: Path) -> None:
    path.write_text(dumps(recording), encoding="utf-8")


def frame_of(step: rec.Step) -> ext.ProcessingRequest:
    frame = ext.ProcessingRequest()
    if not step.frame.Unpack(frame):
        raise ValueError(f"a step's frame is a {step.frame.TypeName()}, not a ProcessingRequest")
    return frame


def expectation_of(
    response: ext.ProcessingResponse, model: str, target_pod_header: str = "target-pod"
) -> rec.Expectation:
    """What `response` shows, with per-moment values written as matches."""
    kind = response.WhichOneof("response") or ""
    expect = rec.Expectation(kind=kind)
    if kind == "immediate_response":
        immediate = response.immediate_response
        expect.status = immediate.status.code
        expect.error_code = error_code_of(immediate.body)
        mutation = immediate.headers
    else:
        common = getattr(response, kind).response
        expect.empty = getattr(response, kind).ByteSize() == 0
        expect.clear_route_cache = common.clear_route_cache
        mutation = common.header_mutation
        body = common.body_mutation
        if body.HasField("streamed_response"):
            expect.body_text = body.streamed_response.body.decode("utf-8", "replace")
            expect.end_of_stream = body.streamed_response.end_of_stream
        elif body.WhichOneof("mutation") == "body":
            expect.body_text = body.body.decode("utf-8", "replace")
    pod_headers = POD_HEADERS | {target_pod_header}
    for option in mutation.set_headers:
        name = option.header.key
        value = option.header.raw_value.decode("utf-8", "replace") or option.header.value
        expect.headers[name].CopyFrom(_header_match(name, value, model, pod_headers))
    if response.HasField("dynamic_metadata"):
        expect.dynamic_metadata.CopyFrom(_generalised_metadata(response.dynamic_metadata, model))
    return expect


def _header_match(
    name: str, value: str, model: str, pod_headers: frozenset[str]
) -> rec.HeaderValue:
    if name in pod_headers and model and "," not in value:
        return rec.HeaderValue(any_pod_of_model=model)
    if name in pod_headers or name in VOLATILE_HEADERS:
        return rec.HeaderValue(present=True)
    return rec.HeaderValue(equals=value)


def _generalised_metadata(metadata: struct_pb2.Struct, model: str) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.CopyFrom(metadata)
    lb = out.fields.get(LB_METADATA_NAMESPACE)
    if lb is not None and DESTINATION_HEADER in lb.struct_value.fields:
        value = lb.struct_value.fields[DESTINATION_HEADER].string_value
        if model and "," not in value:
            lb.struct_value.fields[DESTINATION_HEADER].struct_value.update({"anyPodOfModel": model})
        else:
            lb.struct_value.fields[DESTINATION_HEADER].struct_value.update({"present": True})
    return out


def error_code_of(body: bytes) -> str:
    """The `error.code` of an OpenAI error body; empty when it has none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


class StreamRecorder:
    """Collects one live stream's frames and answers into a Recording."""

    __slots__ = ("_recording", "_target_pod_header")

    def __init__(self, name: str, target_pod_header: str) -> None:
        self._recording = rec.Recording(name=name)
        self._target_pod_header = target_pod_header

    def add(
        self, frame: ext.ProcessingRequest, answers: list[ext.ProcessingResponse], model: str
    ) -> None:
        step = self._recording.steps.add()
        step.frame.Pack(frame)
        for answer in answers:
            step.expect.append(expectation_of(answer, model, self._target_pod_header))

    def finish(self, cancelled: bool) -> rec.Recording:
        if cancelled:
            self._recording.ending = rec.Recording.CANCEL
        return self._recording
