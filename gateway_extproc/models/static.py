"""The static model file: a YAML dictionary for running without a cluster.

    models:
      - name: llama-3-8b
        tokenizer: /models/llama-3-8b     # optional: precise prefix routing
        pods:
          - {name: llama-0, address: 127.0.0.1:8001, kv_events: tcp://127.0.0.1:5557}
          - {name: llama-1, address: 127.0.0.1:8002, state: terminating}

    aliases:                              # optional: names that split traffic
      llama-3: {llama-3-8b-v2: 90, llama-3-8b-v3: 10}

A pod's `state` is `ready` (default), `not-ready` or `terminating`; `metrics_address`
is optional, and so are `kv_events` (where its engine publishes KV-cache events,
`tcp://host:port`) and `kv_events_replay` (its replay socket). A model's `tokenizer` is a
Hugging Face tokenizer directory (tokenizer.json, optionally tokenizer_config.json); a
relative path is relative to the file. The same pod name may appear under several models
(a pod serving a base model and its LoRA adapters). The file is re-read when it changes;
a bad file is rejected with a log line naming the problem and the last good dictionary
stays.

An alias maps a name clients may use to target models with integer weights (0 drains a
target); models/aliases.py says how a target is chosen. An alias may not share a name
with a model of the file, nor name another alias as a target.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from gateway_extproc.models.aliases import Alias
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.static")

POD_STATES = ("ready", "not-ready", "terminating")


class ModelFileError(ValueError):
    """The model file cannot be used; the message names the problem and where it is."""


@dataclass(frozen=True)
class ModelsFile:
    pods: list[Pod]
    tokenizers: dict[str, str] = field(default_factory=dict)  # model -> directory
    aliases: dict[str, Alias] = field(default_factory=dict)


def parse_models_file(text: str) -> list[Pod]:
    return parse_models(text).pods


def parse_models(text: str, base: Path | None = None) -> ModelsFile:
    """The pods and the models' tokenizer directories (relative ones joined to `base`)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelFileError(f"not valid YAML: {exc}") from None
    if doc is None:
        doc = {"models": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("models", []), list):
        raise ModelFileError("the file must be a mapping with a list under `models`")
    unknown = set(doc) - {"models", "aliases"}
    if unknown:
        raise ModelFileError(f"unknown top-level keys: {', '.join(sorted(map(str, unknown)))}")
    pods: dict[str, dict[str, Any]] = {}
    tokenizers: dict[str, str] = {}
    names: set[str] = set()
    for m_index, model in enumerate(doc.get("models") or []):
        where = f"models[{m_index}]"
        if not isinstance(model, dict):
            raise ModelFileError(f"{where} must be a mapping with `name` and `pods`")
        name = model.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ModelFileError(f"{where}.name must be a non-empty string")
        names.add(name)
        tokenizer = model.get("tokenizer")
        if tokenizer is not None:
            if not isinstance(tokenizer, str) or not tokenizer.strip():
                raise ModelFileError(f"{where}.tokenizer must be a directory path")
            path = Path(tokenizer).expanduser()
            tokenizers[name] = str(base / path if base is not None else path)
        model_pods = model.get("pods")
        if model_pods is None:
            model_pods = []
        if not isinstance(model_pods, list):
            raise ModelFileError(f"{where}.pods must be a list")
        for p_index, raw in enumerate(model_pods):
            _add_pod(pods, raw, name, f"{where}.pods[{p_index}]")
    aliases = _parse_aliases(doc.get("aliases"), names)
    return ModelsFile(
        aliases=aliases,
        pods=[
            Pod(
                name=p["name"],
                address=p["address"],
                models=tuple(p["models"]),
                ready=p["state"] != "not-ready",
                terminating=p["state"] == "terminating",
                metrics_address=p["metrics_address"],
                kv_events=p["kv_events"],
                kv_events_replay=p["kv_events_replay"],
            )
            for p in pods.values()
        ],
        tokenizers=tokenizers,
    )


def _parse_aliases(raw: Any, models: set[str]) -> dict[str, Alias]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ModelFileError("`aliases` must be a mapping of alias -> {target model: weight}")
    aliases: dict[str, Alias] = {}
    for name, targets in raw.items():
        where = f"aliases.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ModelFileError("an alias name must be a non-empty string")
        if name in models:
            raise ModelFileError(f"{where}: {name!r} is also a model of this file")
        if not isinstance(targets, dict) or not targets:
            raise ModelFileError(f"{where} must map target models to weights")
        parsed = []
        for target, weight in targets.items():
            if not isinstance(target, str) or not target.strip():
                raise ModelFileError(f"{where}: a target must be a model name")
            if target in raw:
                raise ModelFileError(f"{where}: target {target!r} is an alias; name models")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise ModelFileError(f"{where}.{target}: the weight must be an integer >= 0")
            parsed.append((target, weight))
        if not any(weight for _, weight in parsed):
            raise ModelFileError(f"{where}: every weight is 0")
        aliases[name] = Alias(name, tuple(parsed))
    return aliases


def _add_pod(pods: dict[str, dict[str, Any]], raw: Any, model: str, where: str) -> None:
    if not isinstance(raw, dict):
        raise ModelFileError(f"{where} must be a mapping with `name` and `address`")
    unknown = set(raw) - {
        "name",
        "address",
        "state",
        "metrics_address",
        "kv_events",
        "kv_events_replay",
    }
    if unknown:
        raise ModelFileError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ModelFileError(f"{where}.name must be a non-empty string")
    address = _check_address(raw.get("address"), f"{where}.address")
    metrics_address = raw.get("metrics_address") or ""
    if metrics_address:
        metrics_address = _check_address(metrics_address, f"{where}.metrics_address")
    kv_events = _check_endpoint(raw.get("kv_events"), f"{where}.kv_events")
    kv_events_replay = _check_endpoint(raw.get("kv_events_replay"), f"{where}.kv_events_replay")
    if kv_events_replay and not kv_events:
        raise ModelFileError(f"{where}.kv_events_replay needs kv_events")
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
            "kv_events": kv_events,
            "kv_events_replay": kv_events_replay,
            "models": [model],
        }
        return
    if (seen["address"], seen["state"]) != (address, state):
        raise ModelFileError(
            f"{where}: pod {name!r} appears again with a different address or state"
        )
    # Event endpoints need saying once per pod; said twice, they must agree.
    for key, value in (("kv_events", kv_events), ("kv_events_replay", kv_events_replay)):
        if value and seen[key] and seen[key] != value:
            raise ModelFileError(f"{where}: pod {name!r} appears again with a different {key}")
        seen[key] = seen[key] or value
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


def _check_endpoint(value: Any, where: str) -> str:
    """A ZMQ endpoint to connect to: `tcp://host:port` (or `ipc://path`); empty if unset."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ModelFileError(f"{where} must be a string `tcp://host:port`")
    scheme, sep, rest = value.partition("://")
    if sep and scheme == "ipc" and rest:
        return value
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not host or "*" in host:
        raise ModelFileError(f"{where} {value!r} is not `tcp://host:port`")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelFileError(f"{where} {value!r} has no valid port")
    return value


class StaticModelSource:
    """Loads the file into the registry (pods, and the models' tokenizer directories)
    and reloads it when it changes.

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
            parsed = parse_models(self._path.read_text(encoding="utf-8"), self._path.parent)
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
        self._registry.replace_all(parsed.pods)
        self._registry.set_tokenizers(parsed.tokenizers)
        self._registry.set_aliases(parsed.aliases)
        self._synced = True
        log.info(
            "models_file_loaded",
            path=str(self._path),
            pods=len(parsed.pods),
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
