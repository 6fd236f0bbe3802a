"""docs/deploy.md and the example model servers it points to: the example pods carry
the labels the processor discovers them by, and every file the guide names exists."""

from __future__ import annotations

import re

import yaml

from gateway_extproc import cli
from tests.deploy import helpers

GUIDE = helpers.ROOT / "docs" / "deploy.md"
EXAMPLES = sorted((helpers.PLAIN / "examples").glob("*.yaml"))
LABELS = ("model.aibrix.ai/name", "model.aibrix.ai/port", "model.aibrix.ai/metric-port")


def test_guide_names_only_files_that_exist() -> None:
    text = GUIDE.read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:envoy|charts|docs)/[\w./-]+)", text))
    paths.add("Dockerfile")
    assert paths
    for path in paths:
        assert (helpers.ROOT / path.rstrip("/.")).exists(), path


def test_guide_explains_the_pod_labels() -> None:
    text = GUIDE.read_text()
    for label in LABELS:
        assert f"`{label}`" in text, label


def test_example_model_servers_are_discoverable() -> None:
    model_label = yaml.safe_load((helpers.CHART / "values.yaml").read_text())["kubernetes"][
        "modelLabel"
    ]
    served = set()
    assert EXAMPLES
    for path in EXAMPLES:
        for deployment in yaml.safe_load_all(path.read_text()):
            helpers.validate(deployment)
            pod = deployment["spec"]["template"]
            labels = pod["metadata"]["labels"]
            (container,) = pod["spec"]["containers"]
            ports = {p["containerPort"] for p in container["ports"]}
            # The processor reads pods: the labels must be on the template, as strings.
            assert model_label in labels
            assert int(labels["model.aibrix.ai/port"]) in ports
            assert int(labels["model.aibrix.ai/metric-port"]) in ports
            assert container["readinessProbe"]["httpGet"]["path"] == "/health"
            assert deployment["metadata"]["namespace"] == "inference"
            served.add(labels[model_label])
    # The request in the guide asks for a model the examples serve.
    requested = set(re.findall(r'"model": "([^"]+)"', GUIDE.read_text()))
    assert requested and requested <= served


def test_vllm_example_serves_the_labelled_name() -> None:
    (deployment,) = yaml.safe_load_all((helpers.PLAIN / "examples" / "vllm-qwen.yaml").read_text())
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert (
        f"--served-model-name={pod['metadata']['labels']['model.aibrix.ai/name']}"
        in container["args"]
    )


def test_simulated_example_runs_the_images_simulator() -> None:
    (deployment,) = yaml.safe_load_all(
        (helpers.PLAIN / "examples" / "simulated-qwen.yaml").read_text()
    )
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # The image's entry point is gateway-extproc, so args are a sub-command line.
    parsed = cli.build_parser().parse_args(container["args"])

    assert parsed.command == "simulate"
    assert parsed.host == "0.0.0.0"  # reachable on the pod IP, not only loopback
    assert parsed.models == [pod["metadata"]["labels"]["model.aibrix.ai/name"]]
    assert str(parsed.port) == pod["metadata"]["labels"]["model.aibrix.ai/port"]
