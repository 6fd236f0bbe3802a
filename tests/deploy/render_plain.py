"""Write the plain manifests (envoy/gateway/, envoy/inferencepool/) from the chart.

    .venv/bin/python -m tests.deploy.render_plain

Each file is a header comment and the chart's rendering of some templates for release
`gateway-extproc` in namespace `inference`, with the values in tests/deploy/data, minus
what only Helm adds (its bookkeeping labels, the settings checksum). Files not listed
here (the namespace, the Gateway, the examples) are written by hand.
test_plain_manifests.py checks that the files on disk are what this writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.deploy import helpers

RELEASE = "gateway-extproc"
NAMESPACE = "inference"
_HELM_ONLY = re.compile(
    r"^\s*(helm\.sh/chart|app\.kubernetes\.io/managed-by|checksum/settings):.*\n", re.M
)
# An annotations key left with nothing but comments once the checksum is gone: the next
# line that is not a comment is not indented under it.
_EMPTY_ANNOTATIONS = re.compile(r"^( *)annotations:\n(?:\1 +#.*\n)*(?!\1 )", re.M)


@dataclass(frozen=True)
class PlainFile:
    path: Path
    values: str  # file in tests/deploy/data
    templates: tuple[str, ...]  # under templates/, in this order
    header: str


PROCESSOR = (
    "serviceaccount.yaml",
    "rbac.yaml",
    "configmap.yaml",
    "service.yaml",
    "deployment.yaml",
    "pdb.yaml",
    "networkpolicy.yaml",
)

FILES = (
    PlainFile(
        helpers.PLAIN / "20-gateway-extproc.yaml",
        "plain-manifests.values.yaml",
        PROCESSOR,
        """# The gateway-extproc processor: ServiceAccount and the least RBAC its pod informer
# needs, settings (GATEWAY_* variables), Service, Deployment, PodDisruptionBudget, and
# the NetworkPolicy that lets only the Gateway's proxies reach the ext_proc port.
#
# Replace the image with the one you built from this repository's Dockerfile. The pods
# read the settings ConfigMap once at start: after editing it, run
#   kubectl -n inference rollout restart deployment/gateway-extproc
# (the Helm chart does this for you with a checksum annotation).
""",
    ),
    PlainFile(
        helpers.PLAIN / "30-envoy-gateway-policies.yaml",
        "plain-manifests.values.yaml",
        (
            "envoy-gateway/extension-policy.yaml",
            "envoy-gateway/backend-traffic-policy.yaml",
            "envoy-gateway/patch-policy.yaml",
            "envoy-gateway/client-traffic-policy.yaml",
        ),
        """# Envoy Gateway policies that put gateway-extproc in front of the model servers.
# Envoy Gateway v1.5 or newer (the endpoint override), with EnvoyPatchPolicy enabled in
# its configuration (extensionApis.enableEnvoyPatchPolicy: true); see docs/deploy.md.
""",
    ),
    PlainFile(
        helpers.PLAIN / "40-httproute.yaml",
        "plain-manifests.values.yaml",
        ("envoy-gateway/httproute.yaml",),
        """# The OpenAI API paths on the Gateway, routed through the processor to the model pods.
""",
    ),
    PlainFile(
        helpers.PLAIN_INFERENCEPOOL / "20-gateway-extproc.yaml",
        "plain-inferencepool.values.yaml",
        (*PROCESSOR, "inferencepool/inferencepool.yaml"),
        """# gateway-extproc as the endpoint picker of the InferencePool `gateway-extproc`:
# ServiceAccount, RBAC (the namespace's pods and InferencePools), settings, Service
# (ext_proc over TLS on 9002, gRPC health on 9003), Deployment, PodDisruptionBudget, the
# NetworkPolicy that lets only the Gateway's proxies reach 9002 and 9003 (another
# gateway than Envoy Gateway / Envoy AI Gateway: edit its `from`), and the InferencePool
# itself, whose endpointPickerRef names the Service.
#
# Replace the image with the one you built from this repository's Dockerfile, and the
# pool's selector and targetPorts with your model servers' labels and ports.
""",
    ),
    PlainFile(
        helpers.PLAIN_INFERENCEPOOL / "30-httproute.yaml",
        "plain-inferencepool.values.yaml",
        ("inferencepool/httproute.yaml",),
        """# A Gateway API HTTPRoute whose backend is the InferencePool: Envoy Gateway with its
# InferencePool extension (Envoy AI Gateway's), kgateway, Istio or GKE call the pool's
# endpoint picker for every request. Use this or aigatewayroute.yaml.
""",
    ),
    PlainFile(
        helpers.PLAIN_INFERENCEPOOL / "aigatewayroute.yaml",
        "plain-inferencepool.values.yaml",
        ("inferencepool/aigatewayroute.yaml",),
        """# Envoy AI Gateway's AIGatewayRoute to the InferencePool, instead of 30-httproute.yaml:
# requests whose model (read from the body into x-ai-eg-model) is listed go to the pool.
""",
    ),
)


def rendered(values_file: str) -> dict[str, str]:
    """Template path under templates/ -> its text, for release gateway-extproc."""
    values = yaml.safe_load((helpers.DATA / values_file).read_text())
    texts = helpers._render(json.dumps(values, sort_keys=True), RELEASE, NAMESPACE)
    return {path.split("/templates/", 1)[1]: text for path, text in texts}


def text_of(plain: PlainFile) -> str:
    texts = rendered(plain.values)
    parts = [plain.header]
    for template in plain.templates:
        body = _EMPTY_ANNOTATIONS.sub("", _HELM_ONLY.sub("", texts[template])).strip("\n")
        if body:
            parts.append("---\n" + body + "\n")
    return "".join(parts)


def main() -> None:
    for plain in FILES:
        plain.path.parent.mkdir(parents=True, exist_ok=True)
        plain.path.write_text(text_of(plain))
        print(f"wrote {plain.path.relative_to(helpers.ROOT)}")


if __name__ == "__main__":
    main()
