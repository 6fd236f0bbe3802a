"""A fake Kubernetes API server for pods and InferencePools, speaking the list/watch
wire protocol.

It serves what the `kubernetes` Python client uses for pods and for the
`inference.networking.k8s.io/v1` InferencePool custom resource:

- `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods` (and the custom-resource paths
  `/apis/inference.networking.k8s.io/v1[/namespaces/{ns}]/inferencepools`): a JSON list
  with `metadata.resourceVersion`, `labelSelector` filtering (`k`, `!k`, `k=v`, `k==v`,
  `k!=v`, `k in (a,b)`, `k notin (a,b)`, comma-joined), `fieldSelector` on
  `metadata.name` / `metadata.namespace` (`=`, `==`, `!=`) and `limit`/`continue` paging
  over a snapshot;
- the same paths with `watch=true|1`: a chunked stream of newline-delimited
  `{"type": ..., "object": ...}` events from `resourceVersion` on, BOOKMARKs when
  `allowWatchBookmarks` is set, ending after `timeoutSeconds`. Objects that start or stop
  matching the selector arrive as ADDED / DELETED, as the real watch cache does;
- one monotonically increasing resourceVersion shared by everything (like etcd's), and a
  bounded event history: a watch from before it gets an ERROR event with a 410 `Expired`
  Status (or, with `gone_as_http`, an HTTP 410), and an expired `continue` token an HTTP 410.

Tests drive it with thread-safe controls: create / update / mark terminating / delete pods,
create / edit / delete InferencePools, send bookmarks, drop every watch connection, write a
garbage line, compact the history, go down (refuse connections, or answer 503) and come
back on the same port, and read the request log. The server runs its own event loop in a
thread, so the controls are plain calls usable from sync or async tests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

MODEL_LABEL = "model.aibrix.ai/name"

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
PODS = "pods"
POOLS = "inferencepools"

_PATHS = {
    PODS: re.compile(r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?pods$"),
    POOLS: re.compile(
        rf"^/apis/{re.escape(POOL_GROUP)}/{POOL_VERSION}/(?:namespaces/(?P<ns>[^/]+)/)?inferencepools$"
    ),
}
_POOL_API = f"{POOL_GROUP}/{POOL_VERSION}"
_LIST_KINDS = {PODS: ("v1", "PodList"), POOLS: (_POOL_API, "InferencePoolList")}
_KINDS = {PODS: ("v1", "Pod"), POOLS: (_POOL_API, "InferencePool")}
_FIELD_REQ = re.compile(r"^(?P<field>[a-zA-Z.]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^,]*)$")
_SET_REQ = re.compile(r"^(?P<key>[^\s!=,()]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")
_EQ_REQ = re.compile(r"^(?P<key>[^\s!=,()]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^\s!=,()]*)$")
_KEY = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=,()]+)$")


# -- label selectors ------------------------------------------------------------------------

Selector = Callable[[dict[str, str]], bool]


def parse_selector(text: str) -> Selector:
    """Compile a label selector string; raises ValueError on bad syntax."""
    reqs: list[tuple[str, str, frozenset[str]]] = []
    for part in _split_requirements(text):
        if m := _SET_REQ.match(part):
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            reqs.append((m["key"], m["op"], values))
        elif m := _EQ_REQ.match(part):
            op = "!=" if m["op"] == "!=" else "="
            reqs.append((m["key"], op, frozenset([m["value"]])))
        elif m := _KEY.match(part):
            reqs.append((m["key"], "!" if m["neg"] else "exists", frozenset()))
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")

    def matches(labels: dict[str, str]) -> bool:
        return all(_requirement_holds(labels, *req) for req in reqs)

    return matches


FieldSelector = Callable[[dict[str, Any]], bool]


def parse_field_selector(text: str) -> FieldSelector:
    """Compile a field selector on metadata.name / metadata.namespace (what CRDs support
    besides their own selectable fields); raises ValueError otherwise."""
    reqs: list[tuple[str, bool, str]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = _FIELD_REQ.match(part)
        if m is None or m["field"] not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {part!r}")
        reqs.append((m["field"].partition(".")[2], m["op"] != "!=", m["value"].strip()))

    def matches(obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        return all((meta.get(key) == value) is equal for key, equal, value in reqs)

    return matches


def _requirement_holds(labels: dict[str, str], key: str, op: str, values: frozenset[str]) -> bool:
    if op == "exists":
        return key in labels
    if op == "!":
        return key not in labels
    if op in ("in", "="):
        return labels.get(key) in values
    # notin and != also match objects without the label, as Kubernetes does.
    return labels.get(key) not in values


def _split_requirements(text: str) -> Iterable[str]:
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            if text[start:i].strip():
                yield text[start:i].strip()
            start = i + 1
    if text[start:].strip():
        yield text[start:].strip()


# -- objects --------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def pod_object(
    name: str,
    namespace: str = "default",
    *,
    model: str | None = None,
    labels: dict[str, str] | None = None,
    ip: str | None = None,
    phase: str = "Pending",
    ready: bool = False,
) -> dict[str, Any]:
    """A Pod as the API server returns it (the fields clients read, and a few more)."""
    all_labels = dict(labels or {})
    if model is not None:
        all_labels[MODEL_LABEL] = model
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "labels": all_labels,
            "creationTimestamp": _now(),
        },
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:latest"}]},
        "status": {"phase": phase, "conditions": []},
    }
    _set_status(pod, ip=ip, phase=phase, ready=ready)
    return pod


def pool_object(
    name: str,
    namespace: str = "default",
    *,
    selector: dict[str, str],
    target_ports: list[int],
    picker: str = "gateway-extproc",
    picker_port: int = 9002,
) -> dict[str, Any]:
    """An InferencePool as the API server returns it (spec as in the v1 CRD)."""
    return {
        "apiVersion": f"{POOL_GROUP}/{POOL_VERSION}",
        "kind": "InferencePool",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "creationTimestamp": _now(),
        },
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": port} for port in target_ports],
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": picker,
                "port": {"number": picker_port},
                "failureMode": "FailClose",
            },
        },
    }


def _set_status(
    pod: dict[str, Any], *, ip: str | None, phase: str | None, ready: bool | None
) -> None:
    status = pod["status"]
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    if phase is not None:
        status["phase"] = phase
    if ready is not None:
        value = "True" if ready else "False"
        conds = [c for c in status["conditions"] if c["type"] not in ("Ready", "ContainersReady")]
        for kind in ("ContainersReady", "Ready"):
            conds.append({"type": kind, "status": value, "lastTransitionTime": _now()})
        status["conditions"] = conds


def _labels(pod: dict[str, Any]) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


# -- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    at: float

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Watcher:
    resource: str
    namespace: str | None
    selector: Selector
    fields: FieldSelector
    bookmarks: bool
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    transport: asyncio.Transport | None = None

    def sees(self, obj: dict[str, Any]) -> bool:
        return _selected(obj, self.resource, self.namespace, self.selector, self.fields)


def _selected(
    obj: dict[str, Any],
    resource: str,
    namespace: str | None,
    selector: Selector,
    fields: FieldSelector,
) -> bool:
    if obj["kind"] != _KINDS[resource][1]:
        return False
    ns_ok = namespace is None or obj["metadata"]["namespace"] == namespace
    return ns_ok and selector(_labels(obj)) and fields(obj)


class FakeKubeApiServer:
    """Pods, their event history, and an HTTP server that serves them (see module doc)."""

    def __init__(self, *, history_limit: int = 1000, start_resource_version: int = 100) -> None:
        self._lock = threading.RLock()
        # resource -> (namespace, name) -> object; one store per kind served.
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {PODS: {}, POOLS: {}}
        self._pods = self._objects[PODS]
        self._rv = start_resource_version
        # Events with rv > _floor are all in _history; a watch from below _floor is 410.
        self._floor = start_resource_version
        # (rv, kind, object before, object after): a watcher's view of an event depends
        # on whether it saw the object before (selector transitions).
        self._history: deque[tuple[int, str, dict[str, Any] | None, dict[str, Any]]] = deque()
        self._history_limit = history_limit
        self._watchers: list[_Watcher] = []
        self._snapshots: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self._requests: list[RecordedRequest] = []
        self._mode = "up"  # up | refuse | 503
        self.gone_as_http = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.ServerRunner | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKubeApiServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        ready.wait()
        self._call(self._serve())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._unserve())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def __enter__(self) -> FakeKubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_down(self, mode: str = "refuse") -> None:
        """Stop serving: `refuse` closes the port and every connection; `503` answers 503."""
        assert mode in ("refuse", "503")
        with self._lock:
            self._mode = mode
        self.drop_watches()
        if mode == "refuse":
            self._call(self._unserve())

    def come_back(self) -> None:
        with self._lock:
            was, self._mode = self._mode, "up"
        if was == "refuse":
            self._call(self._serve())

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _serve(self) -> None:
        server = web.Server(self._handle)
        self._runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the first start picks a free port

    async def _unserve(self) -> None:
        if self._runner is not None:
            with self._lock:
                watchers = list(self._watchers)
            for watcher in watchers:  # end the handlers, or cleanup waits for them
                watcher.queue.put_nowait(("drop", None))
            await asyncio.sleep(0)
            await self._runner.cleanup()
            self._runner = None

    # -- state controls -------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def get_pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self._lock:
            pod = self._pods.get((namespace, name))
            return copy.deepcopy(pod) if pod else None

    def create_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        model: str | None = None,
        labels: dict[str, str] | None = None,
        ip: str | None = None,
        phase: str = "Pending",
        ready: bool = False,
    ) -> dict[str, Any]:
        pod = pod_object(
            name, namespace, model=model, labels=labels, ip=ip, phase=phase, ready=ready
        )
        with self._lock:
            if (namespace, name) in self._pods:
                raise ValueError(f"pod {namespace}/{name} already exists")
            self._commit("ADDED", None, pod)
            return copy.deepcopy(pod)

    def update_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        ip: str | None = None,
        phase: str | None = None,
        ready: bool | None = None,
        labels: dict[str, str] | None = None,
        silent: bool = False,
    ) -> dict[str, Any]:
        """Change a pod; `silent` changes it without any watch event (a lost event)."""
        with self._lock:
            old = self._pods[(namespace, name)]
            pod = copy.deepcopy(old)
            _set_status(pod, ip=ip, phase=phase, ready=ready)
            if labels is not None:
                pod["metadata"]["labels"] = dict(labels)
            self._commit("MODIFIED", old, pod, silent=silent)
            return copy.deepcopy(pod)

    def mark_terminating(self, name: str, namespace: str = "default", grace: int = 30) -> None:
        """What `kubectl delete` does first: set deletionTimestamp, keep the pod."""
        with self._lock:
            old = self._pods[(namespace, name)]
            pod = copy.deepcopy(old)
            pod["metadata"]["deletionTimestamp"] = _now()
            pod["metadata"]["deletionGracePeriodSeconds"] = grace
            self._commit("MODIFIED", old, pod)

    def delete_pod(self, name: str, namespace: str = "default", *, silent: bool = False) -> None:
        with self._lock:
            old = self._pods[(namespace, name)]
            self._commit("DELETED", old, copy.deepcopy(old), silent=silent)

    # -- InferencePools ---------------------------------------------------------------------

    def get_pool(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self._lock:
            pool = self._objects[POOLS].get((namespace, name))
            return copy.deepcopy(pool) if pool else None

    def create_pool(
        self,
        name: str,
        namespace: str = "default",
        *,
        selector: dict[str, str],
        target_ports: list[int],
        picker: str = "gateway-extproc",
    ) -> dict[str, Any]:
        pool = pool_object(
            name, namespace, selector=selector, target_ports=target_ports, picker=picker
        )
        with self._lock:
            if (namespace, name) in self._objects[POOLS]:
                raise ValueError(f"inferencepool {namespace}/{name} already exists")
            self._commit("ADDED", None, pool, resource=POOLS)
            return copy.deepcopy(pool)

    def update_pool(
        self,
        name: str,
        namespace: str = "default",
        *,
        selector: dict[str, str] | None = None,
        target_ports: list[int] | None = None,
        spec: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Edit a pool's selector and/or ports (or replace its whole spec, valid or not)."""
        with self._lock:
            old = self._objects[POOLS][(namespace, name)]
            pool = copy.deepcopy(old)
            if spec is not None:
                pool["spec"] = copy.deepcopy(spec)
            if selector is not None:
                pool["spec"]["selector"] = {"matchLabels": dict(selector)}
            if target_ports is not None:
                pool["spec"]["targetPorts"] = [{"number": port} for port in target_ports]
            pool["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            self._commit("MODIFIED", old, pool, resource=POOLS)
            return copy.deepcopy(pool)

    def delete_pool(self, name: str, namespace: str = "default") -> None:
        with self._lock:
            old = self._objects[POOLS][(namespace, name)]
            self._commit("DELETED", old, copy.deepcopy(old), resource=POOLS)

    def bump_resource_version(self, count: int = 1) -> int:
        """Other objects changed in etcd: the resourceVersion moves with no pod event."""
        with self._lock:
            self._rv += count
            return self._rv

    def _commit(
        self,
        kind: str,
        old: dict[str, Any] | None,
        pod: dict[str, Any],
        *,
        silent: bool = False,
        resource: str = PODS,
    ) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        store = self._objects[resource]
        if kind == "DELETED":
            store.pop(key, None)
        else:
            store[key] = pod
        if silent:
            return
        snapshot = copy.deepcopy(pod)
        self._history.append((self._rv, kind, old, snapshot))
        while len(self._history) > self._history_limit:
            self._floor = self._history.popleft()[0]
        for watcher in self._watchers:
            typ = _event_for(watcher, kind, old, snapshot)
            if typ is not None:
                self._push(watcher, "event", {"type": typ, "object": snapshot})

    # -- wire controls --------------------------------------------------------------------

    def send_bookmark(self) -> int:
        """Send a BOOKMARK at the current resourceVersion to watches that asked for them."""
        with self._lock:
            for watcher in self._watchers:
                if watcher.bookmarks:
                    api_version, kind = _KINDS[watcher.resource]
                    obj = {
                        "kind": kind,
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(self._rv)},
                    }
                    self._push(watcher, "event", {"type": "BOOKMARK", "object": obj})
            return self._rv

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream; returns how many were cut."""
        with self._lock:
            for watcher in self._watchers:
                self._push(watcher, "drop", None)
            return len(self._watchers)

    def send_garbage(self, line: bytes = b"{this is not json") -> None:
        with self._lock:
            for watcher in self._watchers:
                self._push(watcher, "raw", line + b"\n")

    def compact(self, *, expire_watches: bool = False) -> None:
        """Forget the event history; watches from older versions now get 410.

        `expire_watches` also ends the open watches with an ERROR 410 event, as the API
        server does to a watcher that fell too far behind.
        """
        with self._lock:
            self._history.clear()
            self._floor = self._rv
            self._snapshots.clear()
            if expire_watches:
                gone = _expired(self._rv, self._rv)
                for watcher in self._watchers:
                    self._push(watcher, "event", {"type": "ERROR", "object": gone})
                    self._push(watcher, "end", None)

    @property
    def active_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    def requests(self, *, watch: bool | None = None, resource: str = PODS) -> list[RecordedRequest]:
        """List (`watch=False`) and watch (`watch=True`) requests of `resource` (pods by
        default), oldest first.

        Requests for other paths are left out: on a shared machine a stray client may
        probe any port.
        """
        with self._lock:
            return [
                r
                for r in self._requests
                if _PATHS[resource].match(r.path) and (watch is None or r.watch == watch)
            ]

    def _push(self, watcher: _Watcher, kind: str, payload: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(watcher.queue.put_nowait, (kind, payload))

    # -- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        query = dict(request.query)
        with self._lock:
            self._requests.append(
                RecordedRequest(request.method, request.path, query, time.monotonic())
            )
            mode = self._mode
        if mode != "up":
            return _status_response(status_object(503, "ServiceUnavailable", "apiserver is down"))
        matches = [(r, m) for r, path in _PATHS.items() if (m := path.match(request.path))]
        if not matches:
            return _status_response(status_object(404, "NotFound", "the server could not find it"))
        resource, match = matches[0]
        if request.method != "GET":
            return _status_response(status_object(405, "MethodNotAllowed", "only GET is faked"))
        try:
            selector = parse_selector(query.get("labelSelector", ""))
            fields = parse_field_selector(query.get("fieldSelector", ""))
        except ValueError as exc:
            return _status_response(status_object(400, "BadRequest", str(exc)))
        scope = _Scope(resource, match["ns"], selector, fields)
        if query.get("watch") in ("true", "1"):
            return await self._watch(request, scope, query)
        return self._list(scope, query)

    def _list(self, scope: _Scope, query: dict[str, str]) -> web.Response:
        token = query.get("continue")
        with self._lock:
            if token:
                try:
                    snap_id, offset = json.loads(base64.urlsafe_b64decode(token))
                    rv, items = self._snapshots[snap_id]
                except (ValueError, KeyError, TypeError):
                    return _status_response(
                        status_object(410, "Expired", "the provided continue parameter is too old")
                    )
            else:
                offset, snap_id = 0, uuid.uuid4().hex
                rv = str(self._rv)
                items = [
                    copy.deepcopy(p)
                    for _, p in sorted(self._objects[scope.resource].items())
                    if _selected(p, *scope)
                ]
            limit = int(query.get("limit") or 0)
            page = items[offset : offset + limit] if limit > 0 else items[offset:]
            meta: dict[str, Any] = {"resourceVersion": rv}
            if limit > 0 and offset + limit < len(items):
                self._snapshots[snap_id] = (rv, items)
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps([snap_id, offset + limit]).encode()
                ).decode()
                meta["remainingItemCount"] = len(items) - offset - limit
            else:
                self._snapshots.pop(snap_id, None)
        api_version, list_kind = _LIST_KINDS[scope.resource]
        body = {"apiVersion": api_version, "kind": list_kind, "metadata": meta, "items": page}
        return web.json_response(body)

    async def _watch(
        self, request: web.BaseRequest, scope: _Scope, query: dict[str, str]
    ) -> web.StreamResponse:
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since_raw = query.get("resourceVersion") or "0"
        watcher = _Watcher(*scope, bookmarks=query.get("allowWatchBookmarks") == "true")
        with self._lock:
            since = int(since_raw) if since_raw.isdigit() else -1
            if since < 0:
                return _status_response(status_object(400, "BadRequest", "bad resourceVersion"))
            if since == 0:
                # "Any version": synthetic ADDED for what exists now, then live events.
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(p)}
                    for _, p in sorted(self._objects[scope.resource].items())
                    if watcher.sees(p)
                ]
            elif since < self._floor:
                gone = _expired(since, self._floor)
                if self.gone_as_http:
                    return _status_response(gone)
                initial = [{"type": "ERROR", "object": gone}]
                watcher = None  # type: ignore[assignment]
            else:
                initial = []
                for rv, kind, old, obj in self._history:
                    typ = _event_for(watcher, kind, old, obj) if rv > since else None
                    if typ is not None:
                        initial.append({"type": typ, "object": obj})
            if watcher is not None:
                watcher.transport = request.transport  # type: ignore[assignment]
                self._watchers.append(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for event in initial:
                await resp.write(_line(event))
            if watcher is None:
                await resp.write_eof()
                return resp
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    kind, payload = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if kind == "event":
                    await resp.write(_line(payload))
                elif kind == "raw":
                    await resp.write(payload)
                elif kind == "end":
                    break
                elif kind == "drop":
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away, or we dropped it
        finally:
            if watcher is not None:
                with self._lock:
                    if watcher in self._watchers:
                        self._watchers.remove(watcher)
        return resp


class _Scope(NamedTuple):
    """What one list or watch request asks for."""

    resource: str
    namespace: str | None
    selector: Selector
    fields: FieldSelector


def _event_for(
    watcher: _Watcher, kind: str, old: dict[str, Any] | None, new: dict[str, Any]
) -> str | None:
    """The event type this watcher sees, given what it saw before (None: nothing)."""
    if kind == "DELETED":
        return "DELETED" if watcher.sees(new) else None
    was = old is not None and watcher.sees(old)
    now = watcher.sees(new)
    if was and now:
        return "MODIFIED"
    if now:
        return "ADDED"
    if was:
        return "DELETED"
    return None


def _expired(asked: int, oldest: int) -> dict[str, Any]:
    return status_object(410, "Expired", f"too old resource version: {asked} ({oldest})")


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _status_response(status: dict[str, Any]) -> web.Response:
    return web.json_response(status, status=status["code"])


def write_kubeconfig(path: Path | str, server: str, *, namespace: str = "default") -> Path:
    """A kubeconfig (http, no auth) whose current context points at `server`."""
    path = Path(path)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
        ],
        "current-context": "fake",
    }
    # JSON is YAML, so the client's YAML loader reads it as is.
    path.write_text(json.dumps(config, indent=2))
    return path
