"""gateway-extproc as an InferencePool's endpoint picker behind the real Envoy, configured
the way Envoy AI Gateway configures one (envoy/envoy-inferencepool.yaml: ORIGINAL_DST on
x-gateway-destination-endpoint, FULL_DUPLEX_STREAMED with trailers, TLS to the picker
without certificate validation). The pool and its pods live in the fake, protocol-faithful
API server; the pods point at simulated engines on loopback addresses.

Engines: `blue` (127.0.0.1) serves on two ports, the data-parallel ranks of one pod, and
on a third port; `green` (127.0.0.2) serves on that third port too, so a selector edit
moves traffic from one pod to the other with the same target port.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ProcessGroup
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig
from tests.integration.stack import (
    SIMULATOR_ARGS,
    Gateway,
    Processor,
    add_processor,
    chat,
    poll,
    running_gateway,
)

POOL = "llama-pool"
MODEL = "pool-model"
SECOND_HOST = "127.0.0.2"  # loopback too: a second pod IP on this machine
ENVOY_INFERENCEPOOL = localstack.REPO_ROOT / "envoy" / "envoy-inferencepool.yaml"
SELECTION = "test-epp-endpoint-selection"
ECHO = "x-conformance-test-served-endpoint"
HEADER_TO_METADATA = (
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config"
)


@dataclass
class Cluster:
    fake: FakeKubeApiServer
    rank_ports: tuple[int, int]  # blue's two ranks
    shared_port: int  # blue and green both serve here
    processor: Processor


def port_free_on_both_hosts() -> int:
    while True:
        port = localstack.free_port()
        if localstack.port_is_free(port, SECOND_HOST):
            return port


def simulator(
    host: str, port: int, log_dir: Path, env: dict[str, str]
) -> localstack.ManagedProcess:
    argv = localstack.gateway_command("simulate", "--host", host, "--port", str(port))
    argv += ["--model", MODEL, *SIMULATOR_ARGS]
    return localstack.spawn(
        f"engine-{host}-{port}", argv, log_dir, ready_url=f"http://{host}:{port}/health", env=env
    )


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, child_env: dict[str, str]
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("inferencepool")
    ranks = (localstack.free_port(), localstack.free_port())
    shared = port_free_on_both_hosts()
    with FakeKubeApiServer() as fake, ProcessGroup() as group:
        for host, port in [(LOCALHOST, ranks[0]), (LOCALHOST, ranks[1]), (LOCALHOST, shared)]:
            group.add(simulator(host, port, log_dir, child_env))
        group.add(simulator(SECOND_HOST, shared, log_dir, child_env))
        # blue names its model with the label; green leaves it to the engine's /v1/models.
        fake.create_pod(
            "blue-0",
            labels={"app": "llama", "track": "blue", "model.aibrix.ai/name": MODEL},
            ip=LOCALHOST,
            phase="Running",
            ready=True,
        )
        fake.create_pod(
            "green-0",
            labels={"app": "llama", "track": "green"},
            ip=SECOND_HOST,
            phase="Running",
            ready=True,
        )
        kubeconfig = write_kubeconfig(log_dir / "kubeconfig", fake.url)
        processor = add_processor(
            group,
            log_dir / "unused-models.yaml",
            log_dir,
            extra_args=[
                "--discovery",
                "inferencepool",
                "--pool-name",
                POOL,
                "--kubeconfig",
                str(kubeconfig),
                "--grpc-health-port",
                str(localstack.free_port()),
                "--conformance-mode",
            ],
            env=child_env,
            name="processor-inferencepool",
        )
        localstack.wait_ready(group, timeout=30.0)
        yield Cluster(fake, ranks, shared, processor)


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log_dir = tmp_path_factory.mktemp("inferencepool-envoy")
    port = cluster.processor.grpc_port
    with running_gateway(ENVOY_INFERENCEPOOL, port, log_dir, "envoy-inferencepool") as gw:
        yield gw


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[FakeKubeApiServer]:
    """The pool over blue's two ranks, once the processor serves it; deleted after the
    test if it still exists."""
    cluster.fake.create_pool(
        POOL, selector={"app": "llama", "track": "blue"}, target_ports=list(cluster.rank_ports)
    )
    poll(
        "the processor serves the new pool",
        lambda: cluster.processor.get("/debug/models").json()["models"],
        lambda models: models.get(MODEL, {}).get("state") == "ready",
    )
    yield cluster.fake
    if cluster.fake.get_pool(POOL) is not None:
        cluster.fake.delete_pool(POOL)


def served_by(gateway: Gateway, headers: dict[str, str] | None = None) -> str:
    """The engine that answered, or the status when none did (the polls say which)."""
    response = chat(gateway.port, MODEL, headers, max_tokens=2)
    if response.status != 200:
        return f"{response.status} {response.error_code()}"
    return response.headers["x-simulator-pod"]


def spread(gateway: Gateway, want: set[str]) -> set[str]:
    """Send until every address in `want` has served (or the deadline passes)."""
    seen: set[str] = set()

    def probe() -> set[str]:
        seen.add(served_by(gateway))
        return seen

    return poll(f"traffic reaches {sorted(want)}", probe, lambda s: s >= want)


def test_the_pools_ranks_serve_through_envoy(cluster: Cluster, gateway: Gateway, pool) -> None:
    want = {f"{LOCALHOST}:{port}" for port in cluster.rank_ports}
    assert spread(gateway, want) == want
    # Streaming works end to end in FULL_DUPLEX_STREAMED, trailers and all.
    response = chat(gateway.port, MODEL, stream=True, max_tokens=3)
    assert response.status == 200
    assert response.body.rstrip().endswith(b"data: [DONE]")


def test_a_pool_edit_moves_traffic(cluster: Cluster, gateway: Gateway, pool) -> None:
    spread(gateway, {f"{LOCALHOST}:{cluster.rank_ports[0]}"})
    shared = cluster.shared_port
    pool.update_pool(POOL, target_ports=[shared])
    poll(
        "new target port",
        lambda: served_by(gateway),
        lambda pod: pod == f"{LOCALHOST}:{shared}",
    )
    # The selector now picks green, whose model comes from its engine's /v1/models.
    pool.update_pool(POOL, selector={"app": "llama", "track": "green"})
    poll(
        "new selector",
        lambda: served_by(gateway),
        lambda pod: pod == f"{SECOND_HOST}:{shared}",
    )
    for _ in range(10):
        assert served_by(gateway) == f"{SECOND_HOST}:{shared}"


def test_deleting_the_pool_answers_as_the_empty_dictionary_says(
    cluster: Cluster, gateway: Gateway, pool
) -> None:
    spread(gateway, {f"{LOCALHOST}:{cluster.rank_ports[0]}"})
    pool.delete_pool(POOL)
    response = poll(
        "pool deleted",
        lambda: chat(gateway.port, MODEL),
        lambda r: (r.status, r.error_code()) == (404, "model_not_found"),
    )
    assert response.headers["content-type"] == "application/json"
    # Pods still there, pool gone: the processor's dictionary is empty.
    assert cluster.processor.get("/debug/models").json()["models"] == {}


def test_pods_that_stop_being_ready_answer_503(cluster: Cluster, gateway: Gateway, pool) -> None:
    spread(gateway, {f"{LOCALHOST}:{cluster.rank_ports[0]}"})
    cluster.fake.update_pod("blue-0", ready=False)
    try:
        response = poll(
            "pod not ready",
            lambda: chat(gateway.port, MODEL),
            lambda r: (r.status, r.error_code()) == (503, "no_ready_pods"),
        )
        assert response.headers.get("retry-after")
    finally:
        cluster.fake.update_pod("blue-0", ready=True)


def test_conformance_header_steers_the_pick(cluster: Cluster, gateway: Gateway, pool) -> None:
    second = f"{LOCALHOST}:{cluster.rank_ports[1]}"
    spread(gateway, {f"{LOCALHOST}:{cluster.rank_ports[0]}"})
    for _ in range(10):
        response = chat(gateway.port, MODEL, {SELECTION: second}, max_tokens=1)
        assert response.headers["x-simulator-pod"] == second
        # Envoy AI Gateway's shape does not report the endpoint that served.
        assert response.headers[ECHO] == "fail: missing destination endpoint served metadata"


@pytest.fixture(scope="module")
def reporting_gateway(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """envoy-inferencepool.yaml plus what a data plane needs to tell the picker which
    endpoint served: the router writes %UPSTREAM_HOST% into a response header, a
    header_to_metadata filter moves it to envoy.lb/x-gateway-destination-endpoint-served,
    and the picker's filter forwards that namespace."""
    log_dir = tmp_path_factory.mktemp("inferencepool-reporting")
    doc = yaml.safe_load(ENVOY_INFERENCEPOOL.read_text())
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config = manager["typed_config"]
    picker, router = config["http_filters"]
    picker["typed_config"]["metadata_options"] = {
        "forwarding_namespaces": {"untyped": ["envoy.lb"]}
    }
    served = "x-gateway-destination-endpoint-served"
    to_metadata = {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": HEADER_TO_METADATA,
            "response_rules": [
                {
                    "header": served,
                    "on_header_present": {"metadata_namespace": "envoy.lb", "key": served},
                    "remove": True,
                }
            ],
        },
    }
    config["http_filters"] = [picker, to_metadata, router]
    route = config["route_config"]["virtual_hosts"][0]["routes"][0]
    route["response_headers_to_add"] = [
        {
            "header": {"key": served, "value": "%UPSTREAM_HOST%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    path = log_dir / "envoy-reporting.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with running_gateway(path, cluster.processor.grpc_port, log_dir, "envoy-reporting") as gw:
        yield gw


def test_the_served_endpoint_is_read_back_and_echoed(
    cluster: Cluster, reporting_gateway: Gateway, pool
) -> None:
    for port in cluster.rank_ports:
        endpoint = f"{LOCALHOST}:{port}"
        poll(
            f"echo of {endpoint}",
            lambda e=endpoint: chat(reporting_gateway.port, MODEL, {SELECTION: e}, max_tokens=1),
            lambda r, e=endpoint: r.status == 200 and r.headers.get(ECHO) == e,
        )
