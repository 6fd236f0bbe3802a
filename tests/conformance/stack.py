"""What the capture tool and the replay test share: where the recordings and their
model dictionary live, and how the processor behind them is started.

The capture and the replay must run the processor with the same settings, since a
recording holds what the processor answered: a different `--retry-after-seconds`, say,
would change the `retry-after` header a recording expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess

HERE = Path(__file__).resolve().parent
RECORDINGS = HERE / "recordings"
MODELS_FILE = HERE / "models.yaml"

# The processor's flags besides ports and the models file. Defaults otherwise, so that
# the recordings show what a processor started with no tuning answers.
PROCESSOR_ARGS = ("--log-level", "info")

CHAT_MODEL = "chat-model"
TERMINATING_MODEL = "retiring-model"
UNREADY_MODEL = "cold-model"


def pod_addresses(model: str) -> list[str]:
    """The addresses the conformance dictionary lists for `model`, in file order."""
    doc: dict[str, Any] = yaml.safe_load(MODELS_FILE.read_text(encoding="utf-8"))
    for entry in doc["models"]:
        if entry["name"] == model:
            return [pod["address"] for pod in entry["pods"]]
    raise KeyError(f"{model} is not in {MODELS_FILE}")


def start_processor(
    log_dir: Path, grpc_port: int, admin_port: int, extra_args: tuple[str, ...] = ()
) -> ManagedProcess:
    """`gateway-extproc serve` on the conformance dictionary, with no GATEWAY_* variable
    of the caller's shell leaking into its settings."""
    return localstack.start_processor(
        MODELS_FILE,
        log_dir,
        grpc_port=grpc_port,
        admin_port=admin_port,
        extra_args=(*PROCESSOR_ARGS, *extra_args),
        env=localstack.environment_without_gateway_settings(),
    )
