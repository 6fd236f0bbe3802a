"""The shipped Envoy bootstraps: Envoy itself accepts them (`envoy --mode validate`),
they agree with the processor's defaults, and `render_envoy_config` moves only ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from gateway_extproc.extproc import envoy_names

CONFIGS = [
    localstack.ENVOY_CONFIG,
    localstack.ENVOY_FULL_DUPLEX_CONFIG,
    localstack.ENVOY_FAIL_OPEN_CONFIG,
]


validate = localstack.validate_envoy_config


def http_filter(doc: dict[str, Any], name: str) -> dict[str, Any]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (found,) = [f for f in hcm["typed_config"]["http_filters"] if f["name"] == name]
    return found["typed_config"]  # type: ignore[no-any-return]


def ext_proc_filter(doc: dict[str, Any]) -> dict[str, Any]:
    return http_filter(doc, "envoy.filters.http.ext_proc")


def cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    return found  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_accepts_the_shipped_config(path: Path) -> None:
    result = validate(path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    # The check above means something only if validate can fail.
    doc = yaml.safe_load(localstack.ENVOY_FULL_DUPLEX_CONFIG.read_text())
    ext_proc_filter(doc)["processing_mode"]["request_trailer_mode"] = "SKIP"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))

    result = validate(broken)

    assert result.returncode != 0
    assert "request_trailer_mode" in result.stdout + result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_rendered_config_is_valid_and_differs_only_in_ports(path: Path, tmp_path: Path) -> None:
    rendered_text = localstack.render_envoy_config(
        path, listen_port=20001, admin_port=20002, extproc_port=20003
    )
    rendered_path = tmp_path / "rendered.yaml"
    rendered_path.write_text(rendered_text)

    result = validate(rendered_path)
    assert result.returncode == 0, result.stdout + result.stderr

    rendered = yaml.safe_load(rendered_text)
    original = yaml.safe_load(path.read_text())
    assert rendered["admin"]["address"]["socket_address"]["port_value"] == 20002
    listener = rendered["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 20001
    endpoint = cluster(rendered, localstack.EXTPROC_CLUSTER)["load_assignment"]["endpoints"][0]
    assert endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 20003,
    }
    # Put the shipped ports back: nothing else may have changed.
    rendered["admin"]["address"]["socket_address"]["port_value"] = 9901
    listener["address"]["socket_address"]["port_value"] = 10000
    endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = 9002
    assert rendered == original


def test_render_names_what_is_missing(tmp_path: Path) -> None:
    doc = yaml.safe_load(localstack.ENVOY_CONFIG.read_text())
    doc["static_resources"]["clusters"] = [
        c for c in doc["static_resources"]["clusters"] if c["name"] != localstack.EXTPROC_CLUSTER
    ]
    path = tmp_path / "no-processor.yaml"
    path.write_text(yaml.safe_dump(doc))

    with pytest.raises(ValueError, match=localstack.EXTPROC_CLUSTER):
        localstack.render_envoy_config(path, listen_port=1, admin_port=2, extproc_port=3)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_buffer_limits_agree_with_the_processor_body_limit(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    limit = Settings().max_body_bytes

    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == limit
    assert cluster(doc, "inference_pods")["per_connection_buffer_limit_bytes"] == limit
    # The processor's cluster carries the whole body in one gRPC message, plus framing.
    assert cluster(doc, localstack.EXTPROC_CLUSTER)["per_connection_buffer_limit_bytes"] > limit


def observer_filter(doc: dict[str, Any]) -> dict[str, Any]:
    return http_filter(doc, "gateway-extproc-observer")


def role(config: dict[str, Any]) -> str:
    (entry,) = config["grpc_service"]["initial_metadata"]
    assert entry["key"] == envoy_names.ROLE_METADATA
    value: str = entry["value"]
    return value


def test_processing_modes_are_the_documented_ones() -> None:
    shipped = yaml.safe_load(localstack.ENVOY_CONFIG.read_text())
    routing, observer = ext_proc_filter(shipped), observer_filter(shipped)
    duplex = ext_proc_filter(yaml.safe_load(localstack.ENVOY_FULL_DUPLEX_CONFIG.read_text()))

    # envoy.yaml: the routing filter waits for the request phases only...
    assert routing["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    }
    assert role(routing) == envoy_names.ROUTE_ROLE
    assert (
        envoy_names.HANDOFF_NAMESPACE
        in routing["metadata_options"]["receiving_namespaces"]["untyped"]
    )
    # ...and the observer sees the response without holding it, tied to the routing
    # stream by the forwarded key, the status coming as an attribute.
    assert observer["observability_mode"] is True
    assert observer["failure_mode_allow"] is True
    assert observer["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
        "response_trailer_mode": "SKIP",
    }
    assert role(observer) == envoy_names.OBSERVE_ROLE
    assert observer["metadata_options"]["forwarding_namespaces"]["untyped"] == [
        envoy_names.HANDOFF_NAMESPACE
    ]
    # The details tell an engine's own 5xx from Envoy's for a pod that failed (passive
    # health counts both); in full duplex the status comes with the response headers.
    assert observer["response_attributes"] == [
        envoy_names.STATUS_ATTRIBUTE,
        envoy_names.DETAILS_ATTRIBUTE,
    ]
    assert duplex["response_attributes"] == [envoy_names.DETAILS_ATTRIBUTE]
    # envoy-full-duplex.yaml: one filter, the whole exchange on one stream.
    assert duplex["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_header_mode": "SEND",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "response_trailer_mode": "SEND",
    }
    assert "initial_metadata" not in duplex["grpc_service"]
    for config in (routing, duplex):
        assert config["failure_mode_allow"] is False  # fail closed
    for config in (routing, observer, duplex):
        assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == localstack.EXTPROC_CLUSTER


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_pods_are_reached_through_the_destination_header(path: Path) -> None:
    pods = cluster(yaml.safe_load(path.read_text()), "inference_pods")

    assert pods["type"] == "ORIGINAL_DST"
    assert pods["lb_policy"] == "CLUSTER_PROVIDED"
    assert pods["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_long_streams_do_not_trip_envoys_default_circuit_breakers(path: Path) -> None:
    # Each request in flight holds a pod request and a processor stream per ext_proc
    # filter for its whole response; Envoy's default breaker (1,024 requests per cluster)
    # would answer request 1,025 with a 503.
    doc = yaml.safe_load(path.read_text())
    for name in ("inference_pods", localstack.EXTPROC_CLUSTER):
        (limits,) = cluster(doc, name)["circuit_breakers"]["thresholds"]
        assert limits["max_requests"] >= 100_000
        assert limits["max_pending_requests"] >= 100_000


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_hung_pod_times_out_but_a_long_stream_does_not(path: Path) -> None:
    (route,) = localstack.pod_routes(yaml.safe_load(path.read_text()))
    assert route["timeout"] == "0s"  # no deadline on a whole (streamed) response
    policy = route["retry_policy"]
    # ...but an attempt that sends nothing for two minutes is over (a 504 that passive
    # health counts), and a failed connection is tried once more.
    assert policy["per_try_idle_timeout"] == "120s"
    assert set(policy["retry_on"].split(",")) == {"reset", "connect-failure", "refused-stream"}
    assert policy["num_retries"] == 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_draining_or_dead_processor_is_taken_out_within_about_a_second(path: Path) -> None:
    processor = cluster(yaml.safe_load(path.read_text()), localstack.EXTPROC_CLUSTER)
    (check,) = processor["health_checks"]
    assert check["grpc_health_check"]["service_name"] == (
        "envoy.service.ext_proc.v3.ExternalProcessor"
    )
    assert check["interval"] == check["no_traffic_interval"] == "1s"
    assert check["unhealthy_threshold"] == 1
    assert processor["outlier_detection"]["consecutive_local_origin_failure"] == 1


def test_the_fail_open_shape_is_envoy_yaml_but_for_what_makes_it_fail_open() -> None:
    # envoy-fail-open.yaml must not drift from envoy.yaml (timeouts, limits, health
    # checks): it differs only in the routing filter's failure mode, the route for
    # requests no processor answered, and the cluster that route goes to.
    shipped = yaml.safe_load(localstack.ENVOY_CONFIG.read_text())
    fail_open = yaml.safe_load(localstack.ENVOY_FAIL_OPEN_CONFIG.read_text())
    routing = ext_proc_filter(fail_open)
    assert routing["failure_mode_allow"] is True
    routing["failure_mode_allow"] = False
    *routes, fallback = fail_open["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert fallback["route"]["cluster"] == "inference_pods_fallback"
    shipped_routes = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    assert routes == shipped_routes[:-1]
    assert "direct_response" in shipped_routes[-1]
    clusters = fail_open["static_resources"]["clusters"]
    assert clusters[0]["name"] == "inference_pods_fallback"
    for doc in (shipped, fail_open):
        doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"
        ]["virtual_hosts"][0]["routes"].pop()
    del clusters[0]
    assert fail_open == shipped


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


EXT_PROC = "envoy.filters.http.ext_proc"  # the routing filter (the observer has its own name)
EDGE_CONFIGS = [*CONFIGS, localstack.REPO_ROOT / "envoy" / "envoy-inferencepool.yaml"]


@pytest.mark.parametrize("path", EDGE_CONFIGS, ids=lambda p: p.name)
def test_a_public_listener_bounds_slow_clients_but_not_long_responses(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager = hcm["typed_config"]
    # Slowloris: headers never finished, a body dripped in, a connection left idle.
    assert 0 < seconds(manager["request_headers_timeout"]) <= 30
    assert 0 < seconds(manager["request_timeout"]) <= 600
    assert 0 < seconds(manager["common_http_protocol_options"]["idle_timeout"]) <= 300
    assert 0 < seconds(manager["stream_idle_timeout"]) <= 600
    h2 = manager["http2_protocol_options"]
    assert h2["max_concurrent_streams"] <= 100
    assert h2["initial_stream_window_size"] <= 65536
    assert h2["initial_connection_window_size"] <= 1048576
    # request_timeout stops once the request is sent upstream, so it cuts no stream, but
    # it does run while the processor decides: it must outlast the longest answer Envoy
    # may wait for (flow control's hold), as must the stream's silence meanwhile.
    filters = manager["http_filters"]
    (ext_proc,) = [f["typed_config"] for f in filters if f["name"].startswith(EXT_PROC)]
    longest = seconds(ext_proc.get("max_message_timeout", ext_proc["message_timeout"]))
    assert seconds(manager["request_timeout"]) > longest
    assert seconds(manager["stream_idle_timeout"]) > longest
    # Nothing bounds a whole response: no route deadline.
    for route in localstack.pod_routes(doc):
        assert route.get("timeout", "0s") == "0s"
    # And a connection cap, so the 60 s idle timeout has something to protect.
    (monitor,) = doc["overload_manager"]["resource_monitors"]
    assert monitor["typed_config"]["max_active_downstream_connections"] <= 10000
