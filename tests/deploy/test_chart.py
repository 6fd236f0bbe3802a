"""The Helm chart: it lints and renders with the real Helm engine, and what it renders is
what a platform team needs from it (health probes on the processor's own endpoints,
graceful termination, a locked-down pod, least-privilege RBAC, the Envoy Gateway wiring
with the processing modes of envoy/envoy.yaml)."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from gateway_extproc.routing.catalog import strategy_problem
from gateway_extproc.routing.registry import PLUGINS
from tests.deploy import helpers

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


@pytest.mark.parametrize("value_set", sorted(helpers.VALUE_SETS))
def test_chart_lints_clean(value_set: str) -> None:
    report = helm.lint(
        helpers.CHART, helpers.VALUE_SETS[value_set], strict=True, namespace=helpers.NAMESPACE
    )
    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert not problems and not report["errors"], report


def test_lint_reports_values_the_schema_refuses() -> None:
    report = helm.lint(helpers.CHART, {"config": {"discovery": "dns"}}, strict=True)
    assert any("discovery" in e for e in report["errors"]), report


@pytest.mark.parametrize(
    "strategy", ["fastest", "least-request:0", "prefix-cache:x", "cache-fit", "a,b", ""]
)
def test_lint_refuses_a_default_strategy_the_processor_does_not_know(strategy: str) -> None:
    report = helm.lint(helpers.CHART, {"config": {"defaultStrategy": strategy}}, strict=True)
    assert any("defaultStrategy" in e for e in report["errors"]), report


def test_the_schemas_strategies_are_the_processors() -> None:
    """Every name the schema accepts is one `serve` accepts, and the other way round."""
    schema = json.loads((helpers.CHART / "values.schema.json").read_text())
    choices = schema["properties"]["config"]["properties"]["defaultStrategy"]["anyOf"]
    (names,) = (c["enum"] for c in choices if "enum" in c)
    (pattern,) = (c["pattern"] for c in choices if "pattern" in c)
    assert sorted(names) == sorted(PLUGINS.profiles)
    combinations = [",".join(f"{s}:2.5" for s in PLUGINS.scorers), "cache-fit,throughput:.5"]
    for combination in combinations:
        assert re.fullmatch(pattern, combination), combination
        assert not strategy_problem(combination)
    for name in names:
        assert not strategy_problem(name)
    for scorer in PLUGINS.scorers:
        assert re.fullmatch(pattern, f"{scorer}:1")
    report = helm.lint(
        helpers.CHART,
        {"config": {"defaultStrategy": "prefix-cache:3,least-request"}},
        strict=True,
    )
    assert not report["errors"], report


# -- the processor's pod ------------------------------------------------------------------


def test_probes_use_the_processors_health_endpoints() -> None:
    objects = helpers.render()
    c = helpers.container(objects)
    env = helpers.settings(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    assert ports == {
        "grpc": int(env["GATEWAY_GRPC_PORT"]),
        "metrics": int(env["GATEWAY_ADMIN_PORT"]),
    }
    assert ports == {"grpc": 9002, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_termination_outlasts_the_processors_grace_period() -> None:
    objects = helpers.render()
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    c = helpers.container(objects)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(helpers.settings(objects)["GATEWAY_GRACE_PERIOD"])
    drain = float(helpers.settings(objects)["GATEWAY_DRAIN_DELAY"])

    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + drain + grace


def test_termination_grace_can_be_set_but_not_below_the_processors() -> None:
    objects = helpers.render({"terminationGracePeriodSeconds": 120})
    assert (
        helpers.one(objects, "Deployment")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        == 120
    )

    message = helpers.render_error(
        {"terminationGracePeriodSeconds": 20, "config": {"gracePeriod": 30}}
    )
    assert "terminationGracePeriodSeconds" in message


def test_pod_runs_non_root_on_a_read_only_root_file_system() -> None:
    objects = helpers.render(helpers.ALL_ON)
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    c = helpers.container(objects)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The only writable places are emptyDirs: scratch space and the recording folder.
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", helpers.ALL_ON["config"]["recordDir"]}
    for mount in c["volumeMounts"]:
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]]
    assert helpers.settings(objects)["GATEWAY_RECORD_DIR"] == helpers.ALL_ON["config"]["recordDir"]


def test_container_is_started_through_the_environment() -> None:
    objects = helpers.render(helpers.ALL_ON)
    c = helpers.container(objects)
    env = helpers.settings(objects)

    assert "command" not in c  # the image's entry point: the gateway-extproc script
    assert c["args"] == ["serve", "--log-level", "debug"]
    assert env["GATEWAY_DEFAULT_STRATEGY"] == "least-request"
    assert env["GATEWAY_INJECT_INCLUDE_USAGE"] == "true"
    assert env["GATEWAY_LOG_FORMAT"] == "console"  # config.extraEnv passes through
    assert c["env"] == [{"name": "PYTHONFAULTHANDLER", "value": "1"}]


def test_settings_changes_roll_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = helpers.one(helpers.render(values), "Deployment")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/settings"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"logLevel": "debug"}})


def test_service_exposes_grpc_as_h2c_and_the_metrics_port() -> None:
    objects = helpers.render()
    service = helpers.one(objects, "Service")
    deployment = helpers.one(objects, "Deployment")
    ports = {p["name"]: p for p in service["spec"]["ports"]}

    assert ports["grpc"]["port"] == 9002 and ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["port"] == 9090
    assert {p["targetPort"] for p in ports.values()} == {"grpc", "metrics"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# -- RBAC -----------------------------------------------------------------------------------

PODS_READ_ONLY = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def bound_account(binding: dict[str, Any]) -> tuple[str, str]:
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    return subject["namespace"], subject["name"]


def test_default_rbac_reads_pods_in_the_release_namespace_only() -> None:
    objects = helpers.render()
    role = helpers.one(objects, "Role")
    binding = helpers.one(objects, "RoleBinding")
    account = helpers.one(objects, "ServiceAccount")
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]

    assert not helpers.all_of(objects, "ClusterRole")
    assert role["rules"] == PODS_READ_ONLY
    assert role["metadata"]["namespace"] == helpers.NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert bound_account(binding) == (helpers.NAMESPACE, account["metadata"]["name"])
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert helpers.settings(objects)["GATEWAY_NAMESPACE"] == helpers.NAMESPACE


def test_namespaced_rbac_covers_every_watched_namespace() -> None:
    objects = helpers.render({"kubernetes": {"watchNamespaces": ["models-a", "models-b"]}})
    roles = helpers.all_of(objects, "Role")
    bindings = helpers.all_of(objects, "RoleBinding")

    assert sorted(r["metadata"]["namespace"] for r in roles) == ["models-a", "models-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["models-a", "models-b"]
    assert all(r["rules"] == PODS_READ_ONLY for r in roles)
    assert helpers.settings(objects)["GATEWAY_NAMESPACE"] == "models-a,models-b"


def test_cluster_rbac_is_one_cluster_role_and_watches_everything() -> None:
    objects = helpers.render({"rbac": {"scope": "cluster"}})
    role = helpers.one(objects, "ClusterRole")
    binding = helpers.one(objects, "ClusterRoleBinding")

    assert not helpers.all_of(objects, "Role")
    assert role["rules"] == PODS_READ_ONLY
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert bound_account(binding)[0] == helpers.NAMESPACE
    assert "GATEWAY_NAMESPACE" not in helpers.settings(objects)  # every namespace


def test_static_discovery_needs_no_cluster_access() -> None:
    objects = helpers.render(helpers.STATIC)
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    env = helpers.settings(objects)

    assert not [
        o
        for o in objects
        if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    assert pod["automountServiceAccountToken"] is False
    assert env["GATEWAY_DISCOVERY"] == "static"
    models = helpers.one(objects, "ConfigMap", f"{helpers.RELEASE}-gateway-extproc-models")
    mount = next(m for m in helpers.container(objects)["volumeMounts"] if m["name"] == "models")
    assert env["GATEWAY_MODELS_FILE"] == f"{mount['mountPath']}/models.yaml"
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
    assert "llama-3-8b" in models["data"]["models.yaml"]


# -- availability and monitoring ------------------------------------------------------------


def test_pdb_and_hpa_target_the_processor() -> None:
    objects = helpers.render(helpers.ALL_ON)
    deployment = helpers.one(objects, "Deployment")
    pdb = helpers.one(objects, "PodDisruptionBudget")
    hpa = helpers.one(objects, "HorizontalPodAutoscaler")

    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert helpers.one(helpers.render(), "Deployment")["spec"]["replicas"] == 2


def test_service_monitor_scrapes_the_metrics_port() -> None:
    objects = helpers.render(helpers.ALL_ON)
    monitor = helpers.one(objects, "ServiceMonitor")
    service = helpers.one(objects, "Service", f"{helpers.RELEASE}-gateway-extproc")

    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_dashboard_config_map_carries_the_dashboard() -> None:
    objects = helpers.render(helpers.ALL_ON)
    cm = helpers.one(objects, "ConfigMap", f"{helpers.RELEASE}-gateway-extproc-dashboard")

    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    shipped = json.loads((helpers.CHART / "dashboards" / "gateway-extproc.json").read_text())
    assert json.loads(cm["data"]["gateway-extproc.json"]) == shipped


def test_optional_parts_are_off_by_default() -> None:
    kinds = {o["kind"] for o in helpers.render()}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "NetworkPolicy",  # not optional: the ext_proc port has no authentication
    }


# -- Envoy Gateway ------------------------------------------------------------------------


def ext_proc(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = helpers.one(objects, "EnvoyExtensionPolicy")["spec"]["extProc"]
    return entry  # type: ignore[no-any-return]


def test_extension_policy_matches_the_shipped_envoy_config() -> None:
    objects = helpers.render(helpers.ENVOY_GATEWAY)
    entry = ext_proc(objects)
    service = helpers.one(objects, "Service", f"{helpers.RELEASE}-gateway-extproc")
    route = helpers.one(objects, "HTTPRoute")
    policy = helpers.one(objects, "EnvoyExtensionPolicy")

    # Same modes as envoy/envoy.yaml: request body buffered, response body streamed.
    assert entry["processingMode"] == {
        "request": {"body": "Buffered"},
        "response": {"body": "Streamed"},
    }
    assert entry["failOpen"] is False
    assert entry["messageTimeout"] == "5s"
    assert entry["metadata"] == {"writableNamespaces": ["envoy.lb"]}
    (backend,) = entry["backendRefs"]
    assert (backend["kind"], backend["name"], backend["port"]) == (
        "Service",
        service["metadata"]["name"],
        9002,
    )
    assert policy["spec"]["targetRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "HTTPRoute",
            "name": route["metadata"]["name"],
        }
    ]
    assert policy["metadata"]["namespace"] == route["metadata"]["namespace"]


def test_full_duplex_is_one_switch() -> None:
    entry = ext_proc(helpers.render(helpers.FULL_DUPLEX))
    assert entry["processingMode"] == {
        "request": {"body": "FullDuplexStreamed"},
        "response": {"body": "FullDuplexStreamed"},
    }
    assert entry["failOpen"] is False  # Envoy Gateway requires it for this mode


def test_attaching_to_a_gateway_in_another_namespace() -> None:
    objects = helpers.render(helpers.ALL_ON)
    policy = helpers.one(objects, "EnvoyExtensionPolicy")
    grant = helpers.one(objects, "ReferenceGrant")
    (backend,) = ext_proc(objects)["backendRefs"]
    gateway_ns = helpers.ALL_ON["envoyGateway"]["gateway"]["namespace"]

    assert policy["spec"]["targetRefs"][0]["kind"] == "Gateway"
    assert policy["metadata"]["namespace"] == gateway_ns
    assert backend["namespace"] == helpers.NAMESPACE
    assert grant["metadata"]["namespace"] == helpers.NAMESPACE
    assert grant["spec"]["from"] == [
        {"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy", "namespace": gateway_ns}
    ]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": backend["name"]}]
    for kind in ("EnvoyPatchPolicy", "ClientTrafficPolicy"):
        assert helpers.one(objects, kind)["metadata"]["namespace"] == gateway_ns
    (parent,) = helpers.one(objects, "HTTPRoute")["spec"]["parentRefs"]
    assert parent["namespace"] == gateway_ns


def test_patch_policy_adds_the_original_dst_cluster_for_the_route() -> None:
    objects = helpers.render(helpers.ORIGINAL_DST)
    patch = helpers.one(objects, "EnvoyPatchPolicy")
    cluster_patch, route_patch, *_ = patch["spec"]["jsonPatches"]
    cluster = cluster_patch["operation"]["value"]

    assert patch["spec"]["type"] == "JSONPatch"
    assert patch["spec"]["targetRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "eg",
    }
    assert cluster["type"] == "ORIGINAL_DST"
    assert cluster["original_dst_lb_config"]["http_header_name"] == "x-gateway-destination-endpoint"
    assert cluster["per_connection_buffer_limit_bytes"] == 8388608
    assert route_patch["name"] == f"{helpers.NAMESPACE}/eg/http"
    assert route_patch["operation"]["value"] == cluster["name"]
    # The JSONPath picks exactly the chart route's rules, whatever their host.
    regex = re.search(r"match\(@\.name, '([^']*)'\)", route_patch["operation"]["jsonPath"])
    assert regex
    pattern = re.compile(regex.group(1))
    name = helpers.one(objects, "HTTPRoute")["metadata"]["name"]
    assert pattern.fullmatch(f"httproute/{helpers.NAMESPACE}/{name}/rule/0/match/0/llm_example_com")
    assert not pattern.fullmatch(f"httproute/{helpers.NAMESPACE}/{name}-2/rule/0/match/0/*")
    assert not pattern.fullmatch(f"httproute/other/{name}/rule/0/match/0/*")


def test_dots_in_names_match_only_dots() -> None:
    objects = helpers.render(
        {"envoyGateway": {**helpers.ORIGINAL_DST["envoyGateway"], "httpRoute": {"name": "llm.v1"}}}
    )
    route_patch = helpers.one(objects, "EnvoyPatchPolicy")["spec"]["jsonPatches"][1]
    pattern = re.compile(re.search(r"'([^']*)'", route_patch["operation"]["jsonPath"]).group(1))  # type: ignore[union-attr]

    assert pattern.fullmatch(f"httproute/{helpers.NAMESPACE}/llm.v1/rule/0/match/0/*")
    assert not pattern.fullmatch(f"httproute/{helpers.NAMESPACE}/llmxv1/rule/0/match/0/*")


def test_with_fallbacks_the_cluster_reads_the_single_pick_header() -> None:
    # With fallbacks the destination header is a list, which ORIGINAL_DST cannot take.
    objects = helpers.render({**helpers.ORIGINAL_DST, "config": {"fallbackEndpoints": 2}})
    cluster = helpers.one(objects, "EnvoyPatchPolicy")["spec"]["jsonPatches"][0]["operation"]
    env = helpers.settings(objects)

    assert env["GATEWAY_FALLBACK_ENDPOINTS"] == "2"
    assert cluster["value"]["original_dst_lb_config"]["http_header_name"] == "target-pod"
    assert env["GATEWAY_TARGET_POD_HEADER"] == "target-pod"
    # The endpoint override takes the list itself, in order.
    objects = helpers.render({**helpers.ENVOY_GATEWAY, "config": {"fallbackEndpoints": 2}})
    override = helpers.one(objects, "BackendTrafficPolicy")["spec"]["loadBalancer"]
    assert override["endpointOverride"] == {
        "extractFrom": [{"header": "x-gateway-destination-endpoint"}]
    }


def test_client_buffer_follows_the_processors_body_limit() -> None:
    objects = helpers.render({**helpers.ENVOY_GATEWAY, "config": {"maxBodyBytes": 1048576}})
    ctp = helpers.one(objects, "ClientTrafficPolicy")

    assert ctp["spec"]["connection"]["bufferLimit"] == 1048576
    assert helpers.settings(objects)["GATEWAY_MAX_BODY_BYTES"] == "1048576"
    assert ctp["spec"]["targetRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "eg",
            "sectionName": "http",
        }
    ]


def test_http_route_has_a_resolvable_placeholder_backend() -> None:
    objects = helpers.render(helpers.ORIGINAL_DST)
    route = helpers.one(objects, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    placeholder = helpers.one(objects, "Service", backend["name"])

    assert "selector" not in placeholder["spec"]  # never carries traffic
    assert backend["port"] in {p["port"] for p in placeholder["spec"]["ports"]}
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["timeouts"] == {"request": "0s"}


def test_your_own_backend_and_route() -> None:
    objects = helpers.render(
        {
            "envoyGateway": {
                "enabled": True,
                "httpRoute": {"backendRef": {"name": "vllm", "port": 8080}},
            }
        }
    )
    (backend,) = helpers.one(objects, "HTTPRoute")["spec"]["rules"][0]["backendRefs"]
    assert (backend["name"], backend["port"]) == ("vllm", 8080)
    assert len(helpers.all_of(objects, "Service")) == 1  # no placeholder

    objects = helpers.render(
        {
            "envoyGateway": {
                **helpers.ORIGINAL_DST["envoyGateway"],
                "httpRoute": {"enabled": False, "name": "mine"},
            }
        }
    )
    assert not helpers.all_of(objects, "HTTPRoute")
    assert helpers.one(objects, "EnvoyExtensionPolicy")["spec"]["targetRefs"][0]["name"] == "mine"
    assert (
        "/mine/rule/"
        in helpers.one(objects, "EnvoyPatchPolicy")["spec"]["jsonPatches"][1]["operation"][
            "jsonPath"
        ]
    )

    message = helpers.render_error(
        {"envoyGateway": {"enabled": True, "httpRoute": {"enabled": False}}}
    )
    assert "httpRoute" in message


def test_endpoint_override_replaces_the_original_dst_patch() -> None:
    objects = helpers.render(helpers.ENVOY_GATEWAY)
    route = helpers.one(objects, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    service = helpers.one(objects, "Service", backend["name"])
    policy = helpers.one(objects, "BackendTrafficPolicy")

    # The route's backend is the model-server pods themselves...
    assert service["spec"]["selector"] == helpers.MODEL_PODS
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}
    ]
    # ...and its load balancer goes to the endpoint the processor named.
    assert policy["metadata"]["namespace"] == route["metadata"]["namespace"]
    assert policy["spec"]["targetRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "HTTPRoute",
            "name": route["metadata"]["name"],
        }
    ]
    assert policy["spec"]["loadBalancer"] == {
        "type": "LeastRequest",
        "endpointOverride": {"extractFrom": [{"header": "x-gateway-destination-endpoint"}]},
    }
    assert policy["spec"]["circuitBreaker"]["maxParallelRequests"] == 100000
    # The patch keeps only what no policy says: the 503, the longer wait for a request
    # flow control holds, and the OpenAI error bodies.
    patch = helpers.one(objects, "EnvoyPatchPolicy")
    assert {p["type"].rsplit(".", 1)[-1] for p in patch["spec"]["jsonPatches"]} == {"Listener"}
    assert [p["operation"]["path"] for p in patch["spec"]["jsonPatches"]] == [
        "typed_config/status_on_error",
        "typed_config/max_message_timeout",
        "typed_config/local_reply_config",
    ]


def test_endpoint_override_needs_the_model_pods() -> None:
    message = helpers.render_error({"envoyGateway": {"enabled": True}})
    assert "envoyGateway.httpRoute.backendRef.selector" in message
    # A Service of your own that selects them is fine too.
    objects = helpers.render(
        {"envoyGateway": {"enabled": True, "httpRoute": {"backendRef": {"name": "vllm"}}}}
    )
    assert helpers.one(objects, "BackendTrafficPolicy")
    assert len(helpers.all_of(objects, "Service")) == 1


def test_the_processor_cluster_has_room_and_a_retryable_error() -> None:
    entry = ext_proc(helpers.render(helpers.ENVOY_GATEWAY))
    assert entry["backendSettings"]["circuitBreaker"] == {
        "maxConnections": 1024,
        "maxPendingRequests": 100000,
        "maxParallelRequests": 100000,
    }
    assert "statusOnError" not in entry  # the patch says it (Envoy Gateway before v1.9)
    # With the policy field, the patch leaves the 503 to it.
    objects = helpers.render(helpers.ALL_ON)
    assert ext_proc(objects)["statusOnError"] == 503
    patch = helpers.one(objects, "EnvoyPatchPolicy")
    assert [p["operation"]["path"] for p in patch["spec"]["jsonPatches"]] == [
        "typed_config/max_message_timeout",
        "typed_config/local_reply_config",
    ]
    # Nothing left to patch: no EnvoyPatchPolicy (none to enable in Envoy Gateway either).
    values = {
        "envoyGateway": {
            **helpers.ENVOY_GATEWAY["envoyGateway"],
            "extProc": {"statusOnErrorField": True, "maxMessageTimeout": ""},
            "patchPolicy": {"openAIErrorBodies": False},
        }
    }
    assert not helpers.all_of(helpers.render(values), "EnvoyPatchPolicy")


# -- InferencePool ------------------------------------------------------------------------


def test_inferencepool_mode_is_the_pools_endpoint_picker() -> None:
    objects = helpers.render(helpers.INFERENCEPOOL)
    pool = helpers.one(objects, "InferencePool")
    service = helpers.one(objects, "Service")
    env = helpers.settings(objects)
    c = helpers.container(objects)

    assert pool["metadata"]["namespace"] == helpers.NAMESPACE
    assert pool["spec"]["selector"] == {"matchLabels": {"app": "vllm-qwen"}}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]
    assert pool["spec"]["endpointPickerRef"] == {
        "group": "",
        "kind": "Service",
        "name": service["metadata"]["name"],
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    # The processor serves that pool, over TLS, with gRPC health on its own port.
    assert env["GATEWAY_DISCOVERY"] == "inferencepool"
    assert env["GATEWAY_POOL_NAME"] == pool["metadata"]["name"]
    assert env["GATEWAY_POOL_NAMESPACE"] == helpers.NAMESPACE
    assert env["GATEWAY_SECURE_SERVING"] == "true"
    assert env["GATEWAY_GRPC_HEALTH_PORT"] == "9003"
    ports = {p["name"]: (p["port"], p.get("appProtocol")) for p in service["spec"]["ports"]}
    assert ports == {
        "grpc": (9002, "http2"),
        "metrics": (9090, "http"),
        "grpc-health": (9003, "kubernetes.io/h2c"),
    }
    assert {p["name"] for p in c["ports"]} == {"grpc", "metrics", "grpc-health"}
    # It reads the pool and the pods of its namespace, nothing more.
    (role,) = helpers.all_of(objects, "Role")
    assert role["metadata"]["namespace"] == helpers.NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {
            "apiGroups": ["inference.networking.k8s.io"],
            "resources": ["inferencepools"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    # No Envoy Gateway ext_proc wiring: the gateway builds the picker's filter itself.
    assert not {o["kind"] for o in objects} & {"EnvoyExtensionPolicy", "EnvoyPatchPolicy"}


def test_inferencepool_routes_name_the_pool() -> None:
    objects = helpers.render(helpers.INFERENCEPOOL)
    name = helpers.one(objects, "InferencePool")["metadata"]["name"]
    pool_ref = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}
    route = helpers.one(objects, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [pool_ref]
    assert route["spec"]["parentRefs"][0]["sectionName"] == "http"
    ai_route = helpers.one(objects, "AIGatewayRoute")
    (rule,) = ai_route["spec"]["rules"]
    assert rule["backendRefs"] == [pool_ref]
    assert rule["matches"] == [
        {"headers": [{"type": "Exact", "name": "x-ai-eg-model", "value": "qwen2.5-0.5b"}]}
    ]


def test_an_existing_pool_with_a_certificate_of_its_own() -> None:
    objects = helpers.render(helpers.INFERENCEPOOL_EXISTING)
    env = helpers.settings(objects)
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    c = helpers.container(objects)

    assert not helpers.all_of(objects, "InferencePool")
    assert env["GATEWAY_POOL_NAME"] == "shared-pool"
    assert helpers.one(objects, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["name"] == (
        "shared-pool"
    )
    assert env["GATEWAY_CERT_PATH"] == "/etc/gateway-extproc/tls"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["GATEWAY_CERT_PATH"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": "picker-tls"}
    (parent,) = helpers.one(objects, "AIGatewayRoute")["spec"]["parentRefs"]
    assert parent["namespace"] == "envoy-gateway-system"


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"config": {"discovery": "inferencepool"}}, "inferencePool.selector"),
        (
            {**helpers.INFERENCEPOOL, "envoyGateway": {"enabled": True}},
            "envoyGateway.enabled must be false",
        ),
    ],
)
def test_inferencepool_mode_refuses_what_cannot_work(values: dict[str, Any], problem: str) -> None:
    assert problem in helpers.render_error(values)


# -- documentation ------------------------------------------------------------------------


def documented_keys() -> set[str]:
    text = (helpers.CHART / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", text, re.M))


def values_lines() -> dict[str, int]:
    """Key path -> line index in values.yaml, for every mapping key."""
    paths: dict[str, int] = {}
    stack: list[tuple[int, str]] = []
    for i, line in enumerate((helpers.CHART / "values.yaml").read_text().splitlines()):
        found = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not found:
            continue
        indent = len(found.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, found.group(2)))
        paths[".".join(k for _, k in stack)] = i
    return paths


def test_every_value_is_documented_in_the_readme_and_values_file() -> None:
    documented = documented_keys()
    lines = (helpers.CHART / "values.yaml").read_text().splitlines()
    paths = values_lines()
    with helm.Chart.load(helpers.CHART) as chart:
        defaults = chart.values

    assert documented and documented <= set(paths), sorted(documented - set(paths))
    for path, value in helpers.walk(defaults):
        if isinstance(value, dict) and value:
            continue  # a group of keys: its members are checked
        dotted = ".".join(path)
        ancestors = {".".join(path[:i]) for i in range(1, len(path))}
        # Documented itself, or part of a value documented as a whole (resources, ...).
        assert dotted in documented or ancestors & documented, f"{dotted} is not in README.md"
    for key in documented:
        above = lines[paths[key] - 1].strip()
        comment = lines[paths[key]].partition("#")[2]
        assert above.startswith("#") or comment, f"{key} has no comment in values.yaml"


# -- who may reach the processor ----------------------------------------------------------


def _policy_rules(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]] | None]:
    """Each port the NetworkPolicy opens -> the peers it opens it to (None: anyone)."""
    policy = helpers.one(objects, "NetworkPolicy")
    pods = helpers.one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pods.items()  # it isolates the processor's pods
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    named = {p["name"] for p in helpers.container(objects)["ports"]}
    rules: dict[str, list[dict[str, Any]] | None] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in named  # a named port of the container
            rules[port["port"]] = rule.get("from")
    return rules


def test_only_the_gateways_proxies_may_reach_the_ext_proc_port() -> None:
    objects = helpers.render(helpers.ENVOY_GATEWAY)
    helpers.validate(helpers.one(objects, "NetworkPolicy"))
    rules = _policy_rules(objects)
    assert rules["metrics"] is None  # Prometheus, wherever it runs
    assert rules["grpc"] == [
        {
            "namespaceSelector": {},
            "podSelector": {
                "matchLabels": {
                    "gateway.envoyproxy.io/owning-gateway-name": "eg",
                    "gateway.envoyproxy.io/owning-gateway-namespace": helpers.NAMESPACE,
                }
            },
        }
    ]


def test_with_inferencepool_the_routes_gateway_may_reach_ext_proc_and_health() -> None:
    rules = _policy_rules(helpers.render(helpers.INFERENCEPOOL))
    assert rules["grpc"] == rules["grpc-health"]
    assert rules["grpc"] is not None
    labels = rules["grpc"][0]["podSelector"]["matchLabels"]
    assert labels["gateway.envoyproxy.io/owning-gateway-name"] == "inference-gateway"


def test_network_policy_peers_are_configurable_and_validated() -> None:
    istio = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio"}}}]
    prometheus = [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]
    values = {"networkPolicy": {"gatewayPeers": istio, "adminPeers": prometheus}}
    objects = helpers.render(values)
    helpers.validate(helpers.one(objects, "NetworkPolicy"))
    assert _policy_rules(objects) == {"grpc": istio, "metrics": prometheus}
    # A peer the API server would refuse is caught here, not at `helm install`.
    bad = helpers.render({"networkPolicy": {"gatewayPeers": [{"podSelecter": {}}]}})
    with pytest.raises(AssertionError, match="podSelecter"):
        helpers.validate(helpers.one(bad, "NetworkPolicy"))
    assert not helpers.all_of(
        helpers.render({"networkPolicy": {"enabled": False}}), "NetworkPolicy"
    )


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match[1])


def test_the_gateways_listener_bounds_slow_clients_but_not_long_responses() -> None:
    objects = helpers.render(helpers.ENVOY_GATEWAY)
    ctp = helpers.one(objects, "ClientTrafficPolicy")
    helpers.validate(ctp)
    http = ctp["spec"]["timeout"]["http"]
    assert _seconds(http["requestHeadersReceivedTimeout"]) <= 30
    assert _seconds(http["idleTimeout"]) <= 300
    # Both run while the processor holds a request: they must outlast its longest answer.
    values = yaml.safe_load((helpers.CHART / "values.yaml").read_text())
    longest = _seconds(values["envoyGateway"]["extProc"]["maxMessageTimeout"])
    assert _seconds(http["requestReceivedTimeout"]) > longest
    assert _seconds(http["streamIdleTimeout"]) > longest
    # Nothing bounds a whole response.
    route = helpers.one(objects, "HTTPRoute")
    assert all(r["timeouts"]["request"] == "0s" for r in route["spec"]["rules"])
    # Each can be left to Envoy Gateway's default.
    unset = {"requestHeaders": "", "request": "", "streamIdle": "", "idle": ""}
    values = {"envoyGateway": {**helpers.ENVOY_GATEWAY["envoyGateway"]}}
    values["envoyGateway"]["clientTrafficPolicy"] = {"timeouts": unset}
    assert "timeout" not in helpers.one(helpers.render(values), "ClientTrafficPolicy")["spec"]


def test_allowed_paths_reach_the_processor_and_default_to_its_own() -> None:
    env = helpers.settings(helpers.render(helpers.ALL_ON))
    assert env["GATEWAY_ALLOWED_PATHS"] == "/v1/chat/completions,/v1/audio/*"
    assert "GATEWAY_ALLOWED_PATHS" not in helpers.settings(helpers.render())
    error = helpers.render_error({"config": {"allowedPaths": ["v1/chat"]}})
    assert "allowedPaths" in error
