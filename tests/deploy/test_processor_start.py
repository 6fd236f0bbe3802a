"""The arguments and environment the chart gives the container are ones the processor
accepts: render the chart, take the container's args and env, start `gateway-extproc`
with them, and see it become ready and know the models it should.

Only what cannot exist on a test machine is replaced, the way the kubelet would provide
it: ports (fixed ports may be taken here, so free ephemeral ones), the listen address
(loopback), volumes (ConfigMap and emptyDir mounts become temporary folders, a TLS
Secret a freshly made key pair) and, for kubernetes and inferencepool discovery, the
cluster: no Kubernetes API server can run here and the
in-cluster config needs a service-account token at a fixed path, so GATEWAY_KUBECONFIG
points the processor at tests/fakes' protocol-faithful fake API server instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_extproc import cli, config, tls
from gateway_extproc.devtools import localstack
from tests.deploy import helpers
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def serve_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("gateway-extproc has no serve command")


def serve_env_names() -> set[str]:
    """The GATEWAY_* variables `serve` reads: one per flag."""
    names = set()
    for action in serve_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-") and option != "--help":
                names.add(config.env_name(option))
    return names


def container_launch(
    objects: list[dict[str, Any]],
) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:
    """The container's args, its environment (envFrom ConfigMaps, then env) and mounts."""
    c = helpers.container(objects)
    env = helpers.settings(objects)
    for var in c.get("env", []):
        # A valueFrom would need the API server; the chart has no reason to use one.
        assert "value" in var, f"env {var['name']} has no literal value: {var}"
        env[var["name"]] = str(var["value"])
    return list(c["args"]), env, c.get("volumeMounts", [])


def materialise_volumes(
    objects: list[dict[str, Any]], mounts: list[dict[str, Any]], root: Path
) -> dict[str, str]:
    """Create each mounted volume under `root`; returns mountPath -> local folder."""
    pod = helpers.one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    local: dict[str, str] = {}
    for mount in mounts:
        volume = volumes[mount["name"]]
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        if "configMap" in volume:
            cm = helpers.one(objects, "ConfigMap", volume["configMap"]["name"])
            for key, text in cm["data"].items():
                (folder / key).write_text(text)
        elif "secret" in volume:
            # A kubernetes.io/tls Secret projects tls.crt and tls.key.
            pair = tls.self_signed_key_pair()
            (folder / "tls.crt").write_bytes(pair.certificate_pem)
            (folder / "tls.key").write_bytes(pair.private_key_pem)
        else:
            assert "emptyDir" in volume, f"volume {mount['name']} is neither ConfigMap nor emptyDir"
        local[mount["mountPath"]] = str(folder)
    return local


def relocate(value: str, local: dict[str, str]) -> str:
    for mount_path, folder in local.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return folder + value[len(mount_path.rstrip("/")) :]
    return value


def debug_models(env: dict[str, str]) -> dict[str, Any]:
    url = f"http://127.0.0.1:{env['GATEWAY_ADMIN_PORT']}/debug/models"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["models"]  # type: ignore[no-any-return]


def start(args: list[str], env: dict[str, str], log_dir: Path) -> localstack.ManagedProcess:
    """Start the processor with exactly the chart's arguments and environment; wait for
    /readyz, as the kubelet's readiness probe would."""
    # Only the chart's variables: a stray GATEWAY_* in the test runner's environment
    # must not change what is being tested.
    process = localstack.spawn(
        "gateway-extproc",
        localstack.gateway_command(*args),
        log_dir,
        ready_url=f"http://127.0.0.1:{env['GATEWAY_ADMIN_PORT']}/readyz",
        env={**localstack.environment_without_gateway_settings(), **env},
    )
    try:
        localstack.wait_ready([process], timeout=READY_TIMEOUT)
    except localstack.StartupError as exc:
        process.stop(0)
        pytest.fail(str(exc))
    return process


def stop(process: localstack.ManagedProcess) -> None:
    """SIGTERM, as the kubelet sends after preStop: the processor must exit cleanly."""
    code = process.stop(STOP_TIMEOUT)
    assert code == 0, f"exit status {code} after SIGTERM:\n{process.log_tail()}"


def launch_chart(
    values: dict[str, Any], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    objects = helpers.render(values)
    args, env, mounts = container_launch(objects)
    local = materialise_volumes(objects, mounts, tmp_path / "volumes")
    env = {name: relocate(value, local) for name, value in env.items()}
    args = [relocate(a, local) for a in args]
    env.update(
        GATEWAY_LISTEN_HOST="127.0.0.1",
        GATEWAY_GRPC_PORT=str(localstack.free_port()),
        GATEWAY_ADMIN_PORT=str(localstack.free_port()),
        **(extra_env or {}),
    )
    if "GATEWAY_GRPC_HEALTH_PORT" in env:
        env["GATEWAY_GRPC_HEALTH_PORT"] = str(localstack.free_port())
    return args, env


# -- the checks -------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(helpers.VALUE_SETS))
def test_every_gateway_variable_the_chart_sets_is_a_serve_flag(value_set: str) -> None:
    # An unknown GATEWAY_* variable is silently ignored by the processor, so a typo or a
    # flag that does not exist would go unnoticed in a cluster.
    _, env, _ = container_launch(helpers.render(helpers.VALUE_SETS[value_set]))
    unknown = {n for n in env if n.startswith("GATEWAY_")} - serve_env_names()
    assert not unknown, f"no serve flag reads {sorted(unknown)}"


@pytest.mark.parametrize("value_set", sorted(helpers.VALUE_SETS))
def test_chart_args_and_env_parse_as_the_processor_settings(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, env, _ = container_launch(helpers.render(helpers.VALUE_SETS[value_set]))
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The parser reads GATEWAY_* defaults when it is built, so build it after setting them;
    # a bad value or choice is a SystemExit here, as it would be a crash loop in the pod.
    parsed = cli.build_parser().parse_args(args)
    assert parsed.command == "serve"
    settings = config.settings_from_args(parsed)
    assert settings.grpc_port == 9002 and settings.admin_port == 9090
    assert settings.max_body_bytes == 8388608
    expected_discovery = (
        helpers.VALUE_SETS[value_set].get("config", {}).get("discovery", "kubernetes")
    )
    assert settings.discovery == expected_discovery


@pytest.mark.parametrize(
    ("value_set", "watched"),
    [("defaults", [helpers.NAMESPACE]), ("all-on", ["models-a", "models-b"])],
)
def test_processor_starts_with_kubernetes_discovery_from_the_chart(
    value_set: str, watched: list[str], tmp_path: Path
) -> None:
    with FakeKubeApiServer() as api:
        # One model per watched namespace, with the chart's model label: must show up.
        # Pods sit on loopback at a closed port: the processor scrapes routable pods, and
        # its scrapes must never leave this machine.
        closed_port = str(localstack.free_port())
        for i, namespace in enumerate(watched):
            api.create_pod(
                f"engine-{i}",
                namespace,
                model=f"model-{i}",
                ip="127.0.0.1",
                labels={"model.aibrix.ai/port": closed_port},
                phase="Running",
                ready=True,
            )
        # Same label in a namespace the chart does not watch: must not.
        api.create_pod(
            "other-0", "elsewhere", model="unwatched", ip="127.0.0.1", phase="Running", ready=True
        )
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        args, env = launch_chart(
            helpers.VALUE_SETS[value_set], tmp_path, {"GATEWAY_KUBECONFIG": str(kubeconfig)}
        )
        assert env["GATEWAY_DISCOVERY"] == "kubernetes"
        process = start(args, env, tmp_path)
        try:
            models = debug_models(env)
            assert set(models) == {f"model-{i}" for i in range(len(watched))}, models
            assert models["model-0"]["state"] == "ready"
            assert models["model-0"]["pods"][0]["address"] == f"127.0.0.1:{closed_port}"
        finally:
            stop(process)


def test_processor_starts_with_the_charts_static_models_file(tmp_path: Path) -> None:
    args, env = launch_chart(helpers.STATIC, tmp_path)
    # The file really is the mounted ConfigMap's, found through the chart's path.
    assert env["GATEWAY_MODELS_FILE"].startswith(str(tmp_path))
    process = start(args, env, tmp_path)
    try:
        model = debug_models(env)["llama-3-8b"]
        assert model["state"] == "ready"
        assert {p["name"]: p["ready"] for p in model["pods"]} == {"llama-0": True, "llama-1": False}
    finally:
        stop(process)


async def health_of(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


def serving_soon(port: int, service: str) -> bool:
    for _ in range(100):
        if asyncio.run(health_of(port, service)) == health_pb2.HealthCheckResponse.SERVING:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("value_set", ["inferencepool", "inferencepool-existing"])
def test_processor_starts_as_the_charts_pool_picker(value_set: str, tmp_path: Path) -> None:
    values = helpers.VALUE_SETS[value_set]
    objects = helpers.render(values)
    created = helpers.all_of(objects, "InferencePool")
    with FakeKubeApiServer() as api:
        # The pool the chart creates (or the existing one it names), in its namespace.
        if created:
            spec = created[0]["spec"]
            selector = spec["selector"]["matchLabels"]
            ports = [p["number"] for p in spec["targetPorts"]]
        else:
            selector, ports = {"app": "shared"}, [localstack.free_port()]
        name = helpers.settings(objects)["GATEWAY_POOL_NAME"]
        api.create_pool(name, helpers.NAMESPACE, selector=selector, target_ports=ports)
        # Loopback: the processor scrapes routable endpoints, which must stay here.
        api.create_pod(
            "engine-0",
            helpers.NAMESPACE,
            model="pool-model",
            labels=selector,
            ip="127.0.0.1",
            phase="Running",
            ready=True,
        )
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        args, env = launch_chart(values, tmp_path, {"GATEWAY_KUBECONFIG": str(kubeconfig)})
        process = start(args, env, tmp_path)
        try:
            model = debug_models(env)["pool-model"]
            assert {p["address"] for p in model["pods"]} == {f"127.0.0.1:{p}" for p in ports}
            # ext_proc is TLS, with the Secret's certificate when the chart mounts one.
            served = ssl.get_server_certificate(("127.0.0.1", int(env["GATEWAY_GRPC_PORT"])))
            if "GATEWAY_CERT_PATH" in env:
                mounted = Path(env["GATEWAY_CERT_PATH"]) / "tls.crt"
                assert x509.load_pem_x509_certificate(served.encode()) == (
                    x509.load_pem_x509_certificate(mounted.read_bytes())
                )
            health_port = int(env["GATEWAY_GRPC_HEALTH_PORT"])
            for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                # gRPC health follows /readyz within a fraction of a second.
                assert serving_soon(health_port, service), service
        finally:
            stop(process)
