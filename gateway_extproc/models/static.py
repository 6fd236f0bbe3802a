"""The static model file: a YAML dictionary for running without a cluster.

    models:
      - name: llama-3-8b
        pods:
          - {name: llama-0, address: 127.0.0.1:8001}
          - {name: llama-1, address: 127.0.0.1:8002, state: terminating}

A pod's `state` is `ready` (default), `not-ready` or `terminating`; `metrics_address`
is optional. The same pod name may appear under several models (a pod serving a base
model and its LoRA adapters). The file is re-read when it changes; a bad file is
rejected with a log line naming the problem and the last good dictionary stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from pathlib import Path
from typing import Any

import structlog
import yaml

from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.static")

POD_STATES = ("ready", "not-ready", "terminating")


class ModelFileError(ValueError):
    """The model file cannot be used; the message names the problem and where it is."""


def parse_models_file(text: str) -> list[Pod]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelFileError(f"not valid YAML: {exc}") from None
    if doc is None:
        doc = {"models": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("models", []), list):
        raise ModelFileError("the file must be a mapping with a list under `models`")
    unknown = set(doc) - {"models"}
    if unknown:
        raise ModelFileError(f"unknown top-level keys: {', '.join(sorted(map(str, unknown)))}")
    pods: dict[str, dict[str, Any]] = {}
    for m_index, model in enumerate(doc.get("models") or []):
        where = f"models[{m_index}]"
        if not isinstance(model, dict):
            raise ModelFileError(f"{where} must be a mapping with `name` and `pods`")
        name = model.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ModelFileError(f"{where}.name must be a non-empty string")
        model_pods = model.get("pods")
        if model_pods is None:
            model_pods = []
        if not isinstance(model_pods, list):
            raise ModelFileError(f"{where}.pods must be a list")
        for p_index, raw in enumerate(model_pods):
            _add_pod(pods, raw, name, f"{where}.pods[{p_index}]")
    return [
        Pod(
            name=p["name"],
            address=p["address"],
            models=tuple(p["models"]),
            ready=p["state"] != "not-ready",
            terminating=p["state"] == "terminating",
            metrics_address=p["metrics_address"],
        )
        for p in pods.values()
    ]


def _add_pod(pods: dict[str, dict[str, Any]], raw: Any, model: str, where: str) -> None:
    if not isinstance(raw, dict):
        raise ModelFileError(f"{where} must be a mapping with `name` and `address`")
    unknown = set(raw) - {"name", "address", "state", "metrics_address"}
    if unknown:
        raise ModelFileError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ModelFileError(f"{where}.name must be a non-empty string")
    address = _check_address(raw.get("address"), f"{where}.address")
    metrics_address = raw.get("metrics_address") or ""
    if metrics_address:
        metrics_address = _check_address(metrics_address, f"{where}.metrics_address")
    state = raw.get("state", "ready")
    if state not in POD_STATES:
        raise ModelFileError(f"{where}.state must be one of {', '.join(POD_STATES)}, not {state!r}")
    seen = pods.get(name)
    if seen is None:
        pods[name] = {
            "name": name,
            "address": address,
            "state": state,
            "metrics_address": metrics_address,
            "models": [model],
        }
        return
    if (seen["address"], seen["state"]) != (address, state):
        raise ModelFileError(
            f"{where}: pod {name!r} appears again with a different address or state"
        )
    if model not in seen["models"]:
        seen["models"].append(model)


def _check_address(value: Any, where: str) -> str:
    """`ip:port` (IPv6 as `[addr]:port`): what Envoy's ORIGINAL_DST cluster accepts."""
    if not isinstance(value, str):
        raise ModelFileError(f"{where} must be a string `ip:port`")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelFileError(f"{where} {value!r} is not `ip:port`")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ModelFileError(
            f"{where} {value!r}: the host must be an IP address (Envoy connects to it directly)"
        ) from None
    return value


class StaticModelSource:
    """Loads the file into the registry and reloads it when it changes.

    A DiscoverySource (models/source.py). Without a file every model is unknown: the
    registry gets the empty dictionary and nothing is watched.
    """

    def __init__(self, registry: ModelRegistry, path: str, interval: float = 1.0) -> None:
        self._registry = registry
        self._given = bool(path)
        self._path = Path(path)
        self._synced = False
        self._interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._problem = ""
        self._task: asyncio.Task[None] | None = None

    def load(self) -> bool:
        """Apply the file if it changed; True when a new dictionary took effect."""
        try:
            info = os.stat(self._path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            pods = parse_models_file(self._path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ModelFileError) as exc:
            problem = str(exc)
            if problem != self._problem:  # once per distinct problem, not once per poll
                self._problem = problem
                log.error(
                    "models_file_rejected",
                    path=str(self._path),
                    problem=problem,
                    kept="the last good dictionary stays in force",
                )
            return False
        self._problem = ""
        self._registry.replace_all(pods)
        self._synced = True
        log.info(
            "models_file_loaded",
            path=str(self._path),
            pods=len(pods),
            models=len(self._registry.models()),
        )
        return True

    @property
    def synced(self) -> bool:
        """True once a dictionary (the file's, or the empty one without a file) is in force."""
        return self._synced

    async def start(self) -> None:
        if not self._given:
            log.warning("no_models_file", hint="pass --models-file; every model is unknown (404)")
            self._registry.replace_all([])
            self._synced = True
            return
        self.load()
        self._task = asyncio.create_task(self._watch(), name="models-file-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.load()
