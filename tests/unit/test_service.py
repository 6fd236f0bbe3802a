"""The ext_proc servicer over real gRPC: a stream in, responses out, and clean ends."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_extproc import telemetry
from gateway_extproc.extproc import service as extproc_service
from gateway_extproc.server import start_gateway, stop_gateway
from tests import frames
from tests.settings import loopback_settings
from tests.waiting import eventually

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
"""


@pytest.fixture
async def gateway(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    gateway = await start_gateway(
        loopback_settings(
            models_file=str(path),
            grace_period=1.0,
        )
    )
    yield gateway
    await stop_gateway(gateway)


@pytest.fixture
async def channel(gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield channel


async def test_a_whole_exchange_over_grpc(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [
        frames.request_headers(),
        frames.request_body(orjson.dumps({"model": "llama", "prompt": "hi"})),
        frames.response_headers(200),
        frames.response_body(b"{}", end_of_stream=True),
        frames.response_body(b"", end_of_stream=True),  # after EndOfStream: a no-op
    ]
    got = [r async for r in stub.Process(iter(sent))]
    assert [r.WhichOneof("response") for r in got] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    assert frames.set_headers(got[1])["target-pod"] == "127.0.0.1:18001"
    assert gateway.inflight.total() == 0


async def test_cancelled_stream_releases_the_pod(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    await call.write(frames.request_headers())
    await call.read()
    await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
    await call.read()
    assert gateway.inflight.total() == 1
    call.cancel()  # what Envoy does when the client goes away mid-request
    for _ in range(100):
        if gateway.inflight.total() == 0:
            break
        await asyncio.sleep(0.02)
    assert gateway.inflight.total() == 0


async def test_health_reports_serving_once_the_dictionary_is_loaded(gateway, channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- two filters: the routing stream hands the session to the observer stream ------------

ROUTE = (("x-gateway-extproc-role", "route"),)
OBSERVE = (("x-gateway-extproc-role", "observe"),)
USAGE = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})


def observed(frame, key: str):
    """A frame as the observer filter sends it: observability mode, the key forwarded."""
    frame.observability_mode = True
    frame.metadata_context.filter_metadata["gateway_extproc"]["session"] = key
    return frame


async def route_one(channel) -> str:
    """Route a request on a routing-role stream; returns the handoff key it wrote."""
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": "llama"}))]
    got = [r async for r in stub.Process(iter(sent), metadata=ROUTE)]
    assert [r.WhichOneof("response") for r in got] == ["request_headers", "request_body"]
    metadata = got[1].dynamic_metadata.fields
    assert metadata["envoy.lb"].struct_value.fields[
        "x-gateway-destination-endpoint"
    ].string_value == ("127.0.0.1:18001")
    return metadata["gateway_extproc"].struct_value.fields["session"].string_value


def tokens_counted() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "gateway_tokens_total", {"model": "llama", "pod": "llama-0", "kind": "completion"}
    )
    return value or 0.0


async def test_the_observer_stream_finishes_what_the_routing_stream_routed(gateway, channel):
    before = tokens_counted()
    key = await route_one(channel)
    assert key
    # The routing stream has ended; the request is still in flight until its response.
    assert gateway.inflight.total() == 1
    first = frames.response_body(USAGE)
    first.attributes["envoy.filters.http.ext_proc"]["response.code"] = 200
    sent = [
        observed(frames.request_headers(), key),
        observed(first, key),
        observed(frames.response_body(b"", end_of_stream=True), key),
    ]
    stub = ext_grpc.ExternalProcessorStub(channel)
    got = [r async for r in stub.Process(iter(sent), metadata=OBSERVE)]
    assert got == []  # nothing is answered in observability mode
    assert gateway.inflight.total() == 0
    assert tokens_counted() == before + 3


async def test_the_observer_stream_ends_itself_once_the_response_has_ended(gateway, channel):
    # Envoy resets the observer stream shortly after the response; a stream cut while
    # the processor awaits its next frame leaks native memory in grpcio (about 180
    # bytes, grpc/grpc#43360). The processor ends it first, with status OK.
    before = tokens_counted()
    key = await route_one(channel)
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process(metadata=OBSERVE)
    first = frames.response_body(USAGE)
    first.attributes["envoy.filters.http.ext_proc"]["response.code"] = 200
    await call.write(observed(frames.request_headers(), key))
    await call.write(observed(first, key))
    await call.write(observed(frames.response_body(b"", end_of_stream=True), key))
    # Not half-closed by the client: only the server can end it.
    assert await asyncio.wait_for(call.code(), timeout=5.0) == grpc.StatusCode.OK
    assert gateway.inflight.total() == 0
    assert tokens_counted() == before + 3


async def test_a_client_that_leaves_before_the_response_releases_the_pod(gateway, channel):
    key = await route_one(channel)
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process(metadata=OBSERVE)
    await call.write(observed(frames.request_headers(), key))
    for _ in range(50):  # the observer has claimed the session
        if not len(gateway.processor.handoff):
            break
        await asyncio.sleep(0.02)
    assert gateway.inflight.total() == 1
    call.cancel()  # Envoy ends the observer stream when the client goes away
    for _ in range(100):
        if gateway.inflight.total() == 0:
            break
        await asyncio.sleep(0.02)
    assert gateway.inflight.total() == 0


async def test_a_routed_request_no_observer_claims_is_released_after_the_window(
    gateway, channel, monkeypatch
):
    from prometheus_client import REGISTRY

    # No observer stream has ever claimed a session here: the observer filter is
    # missing, and the request says so once its routing stream has ended.
    # Short enough for the test, long enough that the request is still held when the
    # routing answer has come back on a loaded machine (0.05 s was not).
    monkeypatch.setattr(gateway.processor.handoff, "_window", 1.0)
    monkeypatch.setattr(gateway.processor.handoff, "_grace", 0.05)
    missing = REGISTRY.get_sample_value("gateway_observer_missing_total") or 0.0
    await route_one(channel)
    assert gateway.inflight.total() == 1
    await released(gateway)
    assert REGISTRY.get_sample_value("gateway_observer_missing_total") == missing + 1


async def released(gateway) -> None:
    await eventually(lambda: gateway.inflight.total() == 0, what="every request released")


def cancelled_requests() -> float:
    from prometheus_client import REGISTRY

    labels = {"model": "llama", "status": "499", "code": "client_cancelled"}
    return REGISTRY.get_sample_value("gateway_requests_total", labels) or 0.0


async def test_a_client_that_leaves_before_envoy_reaches_the_observer_is_a_cancel(
    gateway, channel, monkeypatch
):
    from prometheus_client import REGISTRY

    from gateway_extproc.extproc.session import Session

    # Observers work on this processor: one has just claimed a session.
    await test_the_observer_stream_finishes_what_the_routing_stream_routed(gateway, channel)
    missing = REGISTRY.get_sample_value("gateway_observer_missing_total") or 0.0
    cancelled = cancelled_requests()
    # The claim window stays long: only the routing stream's end may release the pod.
    monkeypatch.setattr(gateway.processor.handoff, "_grace", 0.05)
    # Envoy cuts the routing stream before the processor has ended it (the client left
    # while the answer was on its way): held open here so the cut comes first.
    monkeypatch.setattr(Session, "request_answered", property(lambda self: False))
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process(metadata=ROUTE)
    await call.write(frames.request_headers())
    await call.read()
    await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
    await call.read()
    assert gateway.inflight.total() == 1
    call.cancel()

    await released(gateway)
    assert REGISTRY.get_sample_value("gateway_observer_missing_total") == missing
    assert cancelled_requests() == cancelled + 1


async def test_a_request_observed_by_another_process_is_released_here_uncounted(
    gateway, channel, monkeypatch
):
    from prometheus_client import REGISTRY

    # Short enough for the test, long enough that the request is still held when the
    # routing answer has come back on a loaded machine (0.05 s was not).
    monkeypatch.setattr(gateway.processor.handoff, "_window", 1.0)
    # Observers work here, and this processor is one of several: an observer stream of
    # a request another process routed has come here.
    await test_the_observer_stream_finishes_what_the_routing_stream_routed(gateway, channel)
    await test_an_observer_of_a_request_routed_by_another_process_counts_it(gateway, channel)
    await released(gateway)
    missing = REGISTRY.get_sample_value("gateway_observer_missing_total") or 0.0
    aborted = {"model": "llama", "status": "0", "code": "stream_aborted"}
    counted = REGISTRY.get_sample_value("gateway_requests_total", aborted) or 0.0
    cancelled = cancelled_requests()
    # This request's observer stream goes to another process, which counts it.
    await route_one(channel)
    assert gateway.inflight.total() == 1

    await released(gateway)
    assert REGISTRY.get_sample_value("gateway_observer_missing_total") == missing
    assert (REGISTRY.get_sample_value("gateway_requests_total", aborted) or 0.0) == counted
    assert cancelled_requests() == cancelled


async def test_an_observer_without_a_known_key_changes_nothing(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [observed(frames.response_body(USAGE, end_of_stream=True), "no-such-key")]
    assert [r async for r in stub.Process(iter(sent), metadata=OBSERVE)] == []
    # Without observability mode (a misconfigured observer) Envoy would wait: answer.
    plain = frames.response_body(USAGE, end_of_stream=True)
    got = [r async for r in stub.Process(iter([plain]), metadata=OBSERVE)]
    assert [r.WhichOneof("response") for r in got] == ["response_body"]
    assert gateway.inflight.total() == 0


async def test_the_routing_stream_ends_itself_once_the_request_is_routed(gateway, channel):
    # Envoy keeps its side open for the whole request; the processor must end the
    # stream (status OK) after the routing answer, so that nothing of the response
    # depends on this stream (a processor killed later then cuts nothing).
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process(metadata=ROUTE)
    await call.write(frames.request_headers())
    await call.read()
    await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
    routed = await call.read()
    assert routed.WhichOneof("response") == "request_body"
    # Not half-closed by the client: only the server can end it.
    assert await asyncio.wait_for(call.code(), timeout=5.0) == grpc.StatusCode.OK
    # Ending the routing stream hands the request over; it is still in flight until
    # the observer stream (or the claim window) ends it.
    assert gateway.inflight.total() == 1
    assert len(gateway.processor.handoff) == 1


async def test_a_one_filter_stream_stays_open_after_routing(gateway, channel):
    # Without the routing role the response comes on the same stream: it must stay.
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    await call.write(frames.request_headers())
    await call.read()
    await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
    await call.read()
    await call.write(frames.response_headers(200))
    assert (await call.read()).WhichOneof("response") == "response_headers"
    await call.write(frames.response_body(b"{}", end_of_stream=True))
    assert (await call.read()).WhichOneof("response") == "response_body"
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), timeout=5.0) == grpc.StatusCode.OK
    assert gateway.inflight.total() == 0


def requests_counted(status: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "gateway_requests_total", {"model": "llama", "status": status, "code": ""}
    )
    return value or 0.0


async def test_an_observer_of_a_request_routed_by_another_process_counts_it(gateway, channel):
    # Envoy balances each stream on its own: with two replicas (or workers) the observer
    # stream may reach a process that did not route the request. The routing answer's
    # context lets it count and account the response all the same.
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": "llama"}))]
    got = [r async for r in stub.Process(iter(sent), metadata=ROUTE)]
    context = got[1].dynamic_metadata.fields["gateway_extproc"].struct_value
    assert {k: v.string_value for k, v in context.fields.items() if k != "started_at"} == {
        "session": context.fields["session"].string_value,
        "model": "llama",
        "pod": "llama-0",
        "strategy": "predicted-latency",  # the default profile
        "request_id": context.fields["request_id"].string_value,
        "flow_fairness_id": "",
        "flow_priority": "0",
        "api": "openai",  # the API the request spoke (apis/)
    }
    # What another process would see: the same context under a key it never parked.
    foreign = frames.response_body(USAGE)
    foreign.attributes["envoy.filters.http.ext_proc"]["response.code"] = 200
    frames_out = [
        observed(frames.request_headers(), "other-process-key"),
        observed(foreign, "other-process-key"),
        observed(frames.response_body(b"", end_of_stream=True), "other-process-key"),
    ]
    for frame in frames_out:
        for name, value in context.fields.items():
            if name != "session":
                frame.metadata_context.filter_metadata["gateway_extproc"][name] = value.string_value
    counted, tokens = requests_counted("200"), tokens_counted()
    assert [r async for r in stub.Process(iter(frames_out), metadata=OBSERVE)] == []
    assert requests_counted("200") == counted + 1
    assert tokens_counted() == tokens + 3
    # This process's own pick is still in flight (its observer has not come), and the
    # observer of the foreign request released nothing it did not hold.
    assert gateway.inflight.total() == 1


PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
NOT_A_PROCESSING_REQUEST = b"\xff\xff\xff\xff\x0f"  # a varint that never ends


async def test_malformed_messages_are_refused_in_one_line_at_most_every_few_seconds(
    gateway, channel, capsys, monkeypatch
):
    monkeypatch.setattr(extproc_service, "_LOG_LIMIT", telemetry.LogLimit(every=3600))
    process = channel.stream_stream(
        PROCESS, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
    )
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in process(iter([NOT_A_PROCESSING_REQUEST])):
                pass
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Bytes that are not HTTP/2 at all, and HTTP/2 with a frame of an unknown kind on a
    # stream never opened: gRPC itself closes those connections.
    for garbage in (b"GARBAGE" * 100, H2_PREFACE + b"\x00\x00\x04\x99\x00\x00\x00\x00\x01abcd"):
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.grpc_port)
        writer.write(garbage)
        await writer.drain()
        writer.close()

    stub = ext_grpc.ExternalProcessorStub(channel)  # and Envoy is still served
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": "llama"}))]
    got = [r async for r in stub.Process(iter(sent))]
    assert frames.set_headers(got[1])["target-pod"] == "127.0.0.1:18001"
    logged = capsys.readouterr()
    output = logged.out + logged.err
    assert output.count("malformed_message") == 1, output
    assert "Traceback" not in output
    assert "request_aborted" not in output  # nothing was requested: no access log line


def test_a_log_limit_lets_one_line_per_kind_through_and_counts_the_rest():
    now = [0.0]
    limit = telemetry.LogLimit(every=10, clock=lambda: now[0])
    assert limit.allow("a") == 0
    assert limit.allow("a") is None
    assert limit.allow("b") == 0  # another kind has its own allowance
    assert limit.allow("a") is None
    now[0] = 10.0
    assert limit.allow("a") == 2  # the two held back
    assert limit.allow("a") is None


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# -- handoff keys: unguessable, and a claim under a wrong one is refused ----------------


def claims_refused() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("gateway_handoff_claims_refused_total") or 0.0


def observer_frames(key: str, context: dict[str, str]) -> list:
    """An observer stream's frames under `key`, carrying `context` as the routing answer
    wrote it (what a peer that saw one routed request could send)."""
    body = frames.response_body(USAGE)
    body.attributes["envoy.filters.http.ext_proc"]["response.code"] = 200
    sent = [
        observed(frames.request_headers(), key),
        observed(body, key),
        observed(frames.response_body(b"", end_of_stream=True), key),
    ]
    for frame in sent:
        for name, value in context.items():
            frame.metadata_context.filter_metadata["gateway_extproc"][name] = value
    return sent


async def test_handoff_keys_tell_nothing_of_the_next_one(gateway, channel):
    keys = [await route_one(channel) for _ in range(3)]
    instance = {key.split(".")[0] for key in keys}
    assert len(instance) == 1  # this process's id, public by design
    secrets = [key.split(".", 1)[1] for key in keys]
    assert len(set(secrets)) == 3
    # 128 random bits each (base64url, no padding), no counter or process id inside.
    assert all(len(secret) >= 22 for secret in secrets)


async def test_a_claim_under_a_wrong_key_is_refused_and_counted(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": "llama"}))]
    got = [r async for r in stub.Process(iter(sent), metadata=ROUTE)]
    fields = got[1].dynamic_metadata.fields["gateway_extproc"].struct_value.fields
    key = fields["session"].string_value
    context = {k: v.string_value for k, v in fields.items() if k != "session"}
    refused, counted, tokens = claims_refused(), requests_counted("200"), tokens_counted()
    # A peer that has seen one key of this process tries the next ones it can think of.
    instance = key.split(".")[0]
    for guess in (f"{instance}.{'A' * 22}", f"{instance}.1", f"{instance}.{key[::-1]}"):
        assert [
            r async for r in stub.Process(iter(observer_frames(guess, context)), metadata=OBSERVE)
        ] == []
    assert claims_refused() == refused + 3
    # Nothing was counted for the guesses, and the parked request is still in flight.
    assert (requests_counted("200"), tokens_counted()) == (counted, tokens)
    assert gateway.inflight.total() == 1
    # The real observer still finds its session...
    assert [r async for r in stub.Process(iter(observer_frames(key, {})), metadata=OBSERVE)] == []
    assert (requests_counted("200"), tokens_counted()) == (counted + 1, tokens + 3)
    assert gateway.inflight.total() == 0
    # ...and a replay of its key claims nothing more.
    assert [
        r async for r in stub.Process(iter(observer_frames(key, context)), metadata=OBSERVE)
    ] == []
    assert claims_refused() == refused + 4
    assert (requests_counted("200"), tokens_counted()) == (counted + 1, tokens + 3)
