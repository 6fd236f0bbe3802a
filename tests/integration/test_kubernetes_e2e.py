"""Kubernetes discovery through the real Envoy: the status a client sees follows the
pods as the (fake, protocol-faithful) API server changes them, and pods that go away
leave nothing behind."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ProcessGroup
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig
from tests.integration.stack import (
    SIMULATOR_ARGS,
    Gateway,
    Pod,
    Processor,
    add_processor,
    chat,
    poll,
    running_gateway,
)

MODEL = "kube-model"
PORT_LABEL = "model.aibrix.ai/port"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, child_env: dict[str, str]
) -> Iterator[tuple[FakeKubeApiServer, list[Pod], Processor]]:
    """The fake API server, two engines for pods to point at, and a processor that
    discovers pods from the API server."""
    log_dir = tmp_path_factory.mktemp("kubernetes")
    engines = [Pod(f"engine-{i}", f"{LOCALHOST}:{localstack.free_port()}") for i in range(2)]
    with FakeKubeApiServer() as fake, ProcessGroup() as group:
        kubeconfig = write_kubeconfig(log_dir / "kubeconfig", fake.url)
        for engine in engines:
            models = [MODEL, *(f"scale-{i}" for i in range(5))]
            group.add(
                localstack.start_simulator(
                    engine.port,
                    models,
                    log_dir,
                    extra_args=SIMULATOR_ARGS,
                    env=child_env,
                    name=engine.name,
                )
            )
        processor = add_processor(
            group,
            log_dir / "unused-models.yaml",
            log_dir,
            extra_args=["--discovery", "kubernetes", "--kubeconfig", str(kubeconfig)],
            env=child_env,
            name="processor-kubernetes",
        )
        localstack.wait_ready(group, timeout=30.0)
        yield fake, engines, processor


@pytest.fixture(scope="module")
def kube_gateway(cluster, tmp_path_factory) -> Iterator[Gateway]:
    log_dir = tmp_path_factory.mktemp("kubernetes-envoy")
    with running_gateway(localstack.ENVOY_CONFIG, cluster[2].grpc_port, log_dir, "envoy-k8s") as gw:
        yield gw


def outcome(gateway: Gateway, model: str = MODEL) -> tuple[int, str | None]:
    response = chat(gateway.port, model, max_tokens=2)
    return response.status, response.error_code()


def test_pod_lifecycle_is_what_clients_see(cluster, kube_gateway):
    fake, engines, _ = cluster
    poll("unknown at first", lambda: outcome(kube_gateway), lambda o: o == (404, "model_not_found"))

    fake.create_pod("life-0", model=MODEL, labels={PORT_LABEL: str(engines[0].port)})
    poll("pending pod", lambda: outcome(kube_gateway), lambda o: o == (503, "no_ready_pods"))

    fake.update_pod("life-0", ip=LOCALHOST, phase="Running", ready=True)
    served = poll("ready pod", lambda: chat(kube_gateway.port, MODEL), lambda r: r.status == 200)
    assert served.headers["x-simulator-pod"] == engines[0].address

    fake.mark_terminating("life-0")
    response = poll(
        "terminating pod",
        lambda: chat(kube_gateway.port, MODEL),
        lambda r: (r.status, r.error_code()) == (503, "model_terminating"),
    )
    assert response.headers.get("retry-after")

    fake.delete_pod("life-0")
    poll("deleted pod", lambda: outcome(kube_gateway), lambda o: o == (404, "model_not_found"))


def test_a_terminating_pod_takes_no_more_traffic_while_the_other_serves(cluster, kube_gateway):
    fake, engines, _ = cluster
    for i, engine in enumerate(engines):
        fake.create_pod(
            f"pair-{i}",
            model=MODEL,
            ip=LOCALHOST,
            phase="Running",
            ready=True,
            labels={PORT_LABEL: str(engine.port)},
        )
    try:
        seen = set()

        def both_served() -> set[str]:
            seen.add(chat(kube_gateway.port, MODEL, max_tokens=1).headers.get("x-simulator-pod"))
            return seen

        poll("both pods serving", both_served, lambda s: s >= {e.address for e in engines})
        fake.mark_terminating("pair-1")
        # Once the change is seen, every request goes to the pod that stays.
        poll(
            "terminating pod left out",
            lambda: chat(kube_gateway.port, MODEL).headers.get("x-simulator-pod"),
            lambda pod: pod == engines[0].address,
        )
        for _ in range(20):
            response = chat(kube_gateway.port, MODEL, max_tokens=1)
            assert response.status == 200
            assert response.headers["x-simulator-pod"] == engines[0].address
    finally:
        for i in range(len(engines)):
            fake.delete_pod(f"pair-{i}")


def test_a_hundred_pods_come_and_go_without_leaving_state(cluster, kube_gateway):
    fake, engines, processor = cluster
    names = [f"scale-pod-{i:03d}" for i in range(100)]
    for i, name in enumerate(names):
        fake.create_pod(
            name,
            model=f"scale-{i % 5}",
            ip=LOCALHOST,
            phase="Running",
            ready=True,
            labels={PORT_LABEL: str(engines[i % 2].port)},
        )
    poll(
        "all scale models ready",
        lambda: processor.get("/debug/models").json()["models"],
        lambda models: all(f"scale-{i}" in models for i in range(5)),
    )
    for i in range(5):  # traffic creates per-pod counters and series
        assert chat(kube_gateway.port, f"scale-{i}", max_tokens=1).status == 200
    assert "scale-pod-" in processor.metrics()

    for name in names:
        fake.delete_pod(name)
    poll(
        "scale models gone",
        lambda: processor.get("/debug/models").json()["models"],
        lambda models: not any(m.startswith("scale-") for m in models),
    )
    leftovers = [
        line
        for line in processor.metrics().splitlines()
        if re.search(r'pod="default/scale-pod-', line)
    ]
    assert leftovers == []
    assert outcome(kube_gateway, "scale-0") == (404, "model_not_found")
