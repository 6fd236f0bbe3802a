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
stays. A version is used once two reads 0.2 s apart agree (a file caught half-written
is read again later), and an empty file is a bad file (`models: []` is no models).

An alias maps a name clients may use to target models with integer weights (0 drains a
target); models/aliases.py says how a target is chosen. An alias may not share a name
with a model of the file, nor name another alias as a target.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from gateway_extproc import telemetry
from gateway_extproc.models.aliases import Alias
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.static")

POD_STATES = ("ready", "not-ready", "terminating")
# Flow collections ([ or {) opened this many times with none closed in between: no
# models file does that.
_DEEP_FLOW = re.compile(r"(?:[\[{][^\]}\[{]*){64}")
# Seconds between the two reads that must agree before a version of the file is used.
SETTLE_S = 0.2


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
    if _DEEP_FLOW.search(text):
        # PyYAML would take seconds (its scanner is quadratic in the nesting) and then
        # overflow the stack; no models file nests more than a few levels.
        raise ModelFileError("not valid YAML: nested too deeply")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelFileError(f"not valid YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ModelFileError("not valid YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar YAML resolves but cannot build (a bad date)
        raise ModelFileError(f"not valid YAML: {_one_line(str(exc))}") from None
    if doc is None:
        # Most likely caught while being written (or truncated): never taken as "no
        # models", which would answer 404 to every request. `models: []` says that.
        raise ModelFileError("the file is empty (write `models: []` for no models)")
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


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

    A version of the file is applied only once two reads, `settle` seconds apart, give
    the same text: a file caught while being written (or truncated and rewritten in
    place) is read again at the next check rather than taken as a smaller dictionary.
    A rejected version (unreadable, empty, changing, invalid) keeps the last good
    dictionary; the registry's `problem` says so (/readyz), and so do the metrics. The
    watcher survives anything a reload raises.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        path: str,
        interval: float = 1.0,
        settle: float = SETTLE_S,
    ) -> None:
        self._registry = registry
        self._given = bool(path)
        self._path = Path(path)
        self._synced = False
        self._interval = interval
        self._settle = min(settle, interval)
        self._stamp: Stamp | None = None
        self._rejected: tuple[str, Stamp | None] | None = None
        self._loaded_at = ""
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> bool:
        """Apply the file if it changed and reads the same twice; True when a new
        dictionary took effect. Never raises: a failure is a rejected version."""
        stamp: Stamp | None = None
        try:
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                return False
            text = self._read()
            await asyncio.sleep(self._settle)
            again_stamp = _stamp(self._path)
            if again_stamp != stamp or self._read() != text:
                # Still being written: `_stamp` stays old, so the next check reads again.
                log.info("models_file_changing", path=str(self._path), hint="read again later")
                return False
            self._stamp = stamp
            # Off the event loop: a large file must not stall the streams being served.
            parsed = await asyncio.to_thread(parse_models, text, self._path.parent)
        except (OSError, UnicodeDecodeError, ModelFileError) as exc:
            if stamp is None:  # gone: whatever comes back next is read afresh
                self._stamp = None
            self._reject(str(exc), stamp)
            return False
        except Exception as exc:  # a bug or a parser limit: never the watcher's end
            self._reject(f"{type(exc).__name__}: {_one_line(str(exc))}", stamp)
            return False
        self._apply(parsed)
        return True

    def _read(self) -> str:
        return self._path.read_text(encoding="utf-8")

    def _apply(self, parsed: ModelsFile) -> None:
        self._rejected = None
        self._registry.replace_all(parsed.pods)
        self._registry.set_tokenizers(parsed.tokenizers)
        self._registry.set_aliases(parsed.aliases)
        self._registry.problem = ""
        self._synced = True
        now = time.time()
        self._loaded_at = _utc(now)
        telemetry.MODELS_LAST_LOAD.set(now)
        telemetry.MODELS_RELOAD_FAILING.set(0)
        log.info(
            "models_file_loaded",
            path=str(self._path),
            pods=len(parsed.pods),
            models=len(self._registry.models()),
        )

    def _reject(self, problem: str, stamp: Stamp | None) -> None:
        """Keep what is in force; say so once per rejected version (a missing file is
        one version however long it stays missing), in the log, /readyz and metrics."""
        if self._synced:
            kept = f"the dictionary loaded at {self._loaded_at} stays in force"
            self._registry.problem = f"the last reload of {self._path} failed ({problem}); {kept}"
        else:
            kept = "no dictionary is in force yet: not ready, and every model is unknown"
            self._registry.problem = f"{self._path} has not loaded ({problem}); {kept}"
        telemetry.MODELS_RELOAD_FAILING.set(1)
        if (problem, stamp) == self._rejected:
            return
        self._rejected = (problem, stamp)
        telemetry.MODELS_RELOAD_FAILURES.inc()
        log.error("models_file_rejected", path=str(self._path), problem=problem, kept=kept)

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
        await self.load()
        if not self._synced:
            log.warning(
                "models_file_waiting",
                path=str(self._path),
                hint=f"not ready until the file can be loaded; checked every {self._interval:g} s",
            )
        self._task = asyncio.create_task(self._watch(), name="models-file-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.load()
            except Exception as exc:  # load() should not raise; the watcher outlives it
                log.error("models_file_watch_error", problem=f"{type(exc).__name__}: {exc}")


Stamp = tuple[int, int, int]


def _stamp(path: Path) -> Stamp:
    info = os.stat(path)
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
