"""Recording a live stream and replaying it: the round trip, and differences reported."""

from __future__ import annotations

import orjson
import pytest

from gateway_extproc.conformance.replay import replay_paths
from gateway_extproc.extproc import recorder as recordings
from gateway_extproc.proto_gen import recording_pb2 as rec
from gateway_extproc.server import start_gateway, stop_gateway
from tests import frames
from tests.settings import loopback_settings

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
      - {name: llama-1, address: 127.0.0.1:18002}
"""


@pytest.fixture
async def gateway(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    gateway = await start_gateway(
        loopback_settings(
            models_file=str(models),
            record_dir=str(tmp_path / "recorded"),
        )
    )
    yield gateway
    await stop_gateway(gateway)


def write_recording(path, steps, ending=rec.Recording.HALF_CLOSE):
    recording = rec.Recording(name=path.stem, ending=ending)
    for frame, expects in steps:
        step = recording.steps.add()
        step.frame.Pack(frame)
        step.expect.extend(expects)
    recordings.save(recording, path)


async def test_a_recorded_stream_replays_and_passes(gateway, tmp_path):
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

    target = f"127.0.0.1:{gateway.grpc_port}"
    sent = [
        frames.request_headers(),
        frames.request_body(orjson.dumps({"model": "llama", "prompt": "hi"})),
        frames.response_headers(200),
        frames.response_body(b"{}", end_of_stream=True),
        frames.response_body(b"", end_of_stream=True),
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        _ = [r async for r in stub.Process(iter(sent))]
    (written,) = (tmp_path / "recorded").glob("*.json")
    recording = recordings.load(written)
    routed = recording.steps[1].expect[0]
    assert routed.headers["target-pod"].any_pod_of_model == "llama"
    assert routed.headers["x-request-id"].present
    assert routed.clear_route_cache
    assert recording.steps[4].expect[0].empty  # the no-op after EndOfStream
    models_file = tmp_path / "models.yaml"
    results = await replay_paths([written], target, str(models_file))
    assert [r.passed for r in results] == [True], results


async def test_replay_reports_the_first_difference(gateway, tmp_path):
    target = f"127.0.0.1:{gateway.grpc_port}"
    wrong = tmp_path / "wrong.json"
    write_recording(
        wrong,
        [
            (frames.request_headers(), [rec.Expectation(kind="request_headers", empty=True)]),
            (
                frames.request_body(b'{"model": "nope"}'),
                [rec.Expectation(kind="immediate_response", status=503, error_code="x")],
            ),
        ],
    )
    (result,) = await replay_paths([wrong], target)
    assert not result.passed
    assert result.detail == "step 2 answer 1: expected status 503, got 404"


async def test_replay_flags_a_pod_outside_the_model(gateway, tmp_path):
    target = f"127.0.0.1:{gateway.grpc_port}"
    other = tmp_path / "other.yaml"
    other.write_text("models: [{name: llama, pods: [{name: x, address: '10.0.0.9:1'}]}]")
    path = tmp_path / "pod.json"
    routed = rec.Expectation(kind="request_body", clear_route_cache=True)
    routed.headers["target-pod"].any_pod_of_model = "llama"
    write_recording(
        path,
        [
            (frames.request_headers(), [rec.Expectation(kind="request_headers", empty=True)]),
            (frames.request_body(b'{"model": "llama"}'), [routed]),
        ],
        ending=rec.Recording.CANCEL,
    )
    (ok,) = await replay_paths([path], target, str(tmp_path / "models.yaml"))
    assert ok.passed, ok.detail
    (bad,) = await replay_paths([path], target, str(other))
    assert "is not a pod of llama" in bad.detail


async def test_unreadable_recording_is_a_failure_not_a_crash(gateway, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    (result,) = await replay_paths([broken], f"127.0.0.1:{gateway.grpc_port}")
    assert not result.passed
    assert "cannot read" in result.detail
