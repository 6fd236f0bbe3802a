"""envoy/envoy-inferencepool.yaml: Envoy accepts it, and it has the shape Envoy AI Gateway
gives an InferencePool's picker (the end-to-end tests run traffic through it)."""

from __future__ import annotations

import subprocess

import yaml

from gateway_extproc.devtools import localstack

CONFIG = localstack.REPO_ROOT / "envoy" / "envoy-inferencepool.yaml"


def test_envoy_accepts_it() -> None:
    result = subprocess.run(
        [localstack.find_envoy(), "--mode", "validate", "-c", str(CONFIG), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_is_shaped_like_envoy_ai_gateways_picker_config() -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    pool = clusters["inference_pool"]
    assert (pool["type"], pool["lb_policy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED")
    assert pool["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }
    picker_cluster = clusters[localstack.EXTPROC_CLUSTER]
    tls = picker_cluster["transport_socket"]["typed_config"]
    assert tls["common_tls_context"] == {"validation_context": {}}  # no certificate check
    assert "http2_protocol_options" in str(picker_cluster["typed_extension_protocol_options"])
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    picker = manager["typed_config"]["http_filters"][0]["typed_config"]
    assert picker["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_header_mode": "SEND",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "response_trailer_mode": "SEND",
    }
    assert picker["failure_mode_allow"] is False
