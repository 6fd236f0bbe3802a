"""The Kubernetes informer against a fake API server, through the real `kubernetes` client.

Each test starts a `KubernetesSource` whose kubeconfig points at the fake, changes pods
or breaks the wire the way a real cluster does, and checks what the model dictionary
says. Waits poll a condition with a deadline; nothing sleeps for a fixed long time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway_extproc.models.kubernetes import (
    KV_EVENTS_ANNOTATION,
    KV_EVENTS_REPLAY_ANNOTATION,
    KubernetesOptions,
    KubernetesSource,
    PodMapper,
)
from gateway_extproc.models.registry import ModelRegistry, ModelState
from tests.fakes.kube_apiserver import (
    MODEL_LABEL,
    FakeKubeApiServer,
    parse_selector,
    pod_object,
    write_kubeconfig,
)
from tests.waiting import eventually

PORT_LABEL = "model.aibrix.ai/port"
METRIC_PORT_LABEL = "model.aibrix.ai/metric-port"

FAST: dict[str, Any] = {
    "backoff_base": 0.05,
    "backoff_max": 0.3,
    "request_timeout": 5.0,
    "watch_timeout": 30.0,
}

MakeSource = Callable[..., Awaitable[tuple[KubernetesSource, ModelRegistry]]]


def state(registry: ModelRegistry, model: str) -> ModelState:
    return registry.lookup(model).state


@pytest.fixture
def fake() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


@pytest.fixture
def kubeconfig(tmp_path: Path, fake: FakeKubeApiServer) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", fake.url)


@pytest.fixture
async def make_source(kubeconfig: Path) -> AsyncIterator[MakeSource]:
    started: list[KubernetesSource] = []

    async def make(**overrides: Any) -> tuple[KubernetesSource, ModelRegistry]:
        registry = ModelRegistry()
        options = KubernetesOptions(kubeconfig=str(kubeconfig), **{**FAST, **overrides})
        source = KubernetesSource(registry, asyncio.get_running_loop(), options)
        await source.start()
        started.append(source)
        return source, registry

    yield make
    for source in started:
        await source.stop(5.0)
        assert not source.running, "informer thread did not stop"


async def watching(fake: FakeKubeApiServer, source: KubernetesSource) -> None:
    """Synced (the list is applied on the loop) and the watch is open at the server."""
    await eventually(lambda: source.synced and fake.active_watches >= 1, what="watching")


def lists(fake: FakeKubeApiServer) -> int:
    return len(fake.requests(watch=False))


# -- pod and model lifecycle ------------------------------------------------------------------


async def test_pod_lifecycle_drives_model_state(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    source, registry = await make_source()
    assert await source.wait_synced(10)
    fake.create_pod(
        "llama-0", model="llama", labels={PORT_LABEL: "8080", METRIC_PORT_LABEL: "9100"}
    )
    await eventually(lambda: state(registry, "llama") is ModelState.UNAVAILABLE, what="pending")
    pod = registry.pod("default/llama-0")
    assert pod is not None and pod.address == "" and not pod.routable

    fake.update_pod("llama-0", ip="10.1.0.7", phase="Running")  # running, not Ready yet
    await eventually(lambda: registry.pods()[0].address == "10.1.0.7:8080", what="ip")
    assert state(registry, "llama") is ModelState.UNAVAILABLE

    fake.update_pod("llama-0", ready=True)
    await eventually(lambda: state(registry, "llama") is ModelState.READY, what="ready")
    view = registry.lookup("llama")
    assert [p.address for p in view.routable] == ["10.1.0.7:8080"]
    assert view.routable[0].metrics_address == "10.1.0.7:9100"
    assert view.routable[0].namespace == "default" and view.routable[0].models == ("llama",)

    fake.mark_terminating("llama-0")
    await eventually(lambda: state(registry, "llama") is ModelState.TERMINATING, what="term")

    fake.delete_pod("llama-0")
    await eventually(lambda: state(registry, "llama") is ModelState.ABSENT, what="deleted")
    assert registry.pods() == [] and registry.models() == {}


async def test_one_pod_terminating_leaves_model_ready_on_the_other(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    for i in (1, 2):
        fake.create_pod(f"m-{i}", model="mistral", ip=f"10.0.0.{i}", phase="Running", ready=True)
    _source, registry = await make_source()
    await eventually(lambda: len(registry.lookup("mistral").routable) == 2, what="two ready")

    fake.mark_terminating("m-2")
    await eventually(lambda: len(registry.lookup("mistral").routable) == 1, what="one left")
    view = registry.lookup("mistral")
    assert view.state is ModelState.READY
    assert [p.name for p in view.routable] == ["m-1"]
    terminating = registry.pod("default/m-2")
    assert terminating is not None and not registry.is_routable(terminating, "mistral")


async def test_failed_and_succeeded_pods_are_not_routable(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("done", model="phi", ip="10.0.0.9", phase="Succeeded", ready=True)
    fake.create_pod("crashed", model="phi", ip="10.0.0.8", phase="Failed", ready=True)
    source, registry = await make_source()
    assert await source.wait_synced(10)
    assert len(registry.pods()) == 2
    assert state(registry, "phi") is ModelState.UNAVAILABLE


async def test_relabelled_pod_leaves_the_dictionary(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("p", model="qwen", ip="10.0.0.3", phase="Running", ready=True)
    source, registry = await make_source()
    await watching(fake, source)
    assert state(registry, "qwen") is ModelState.READY
    fake.update_pod("p", labels={"app": "something-else"})  # the watch sends DELETED
    await eventually(lambda: state(registry, "qwen") is ModelState.ABSENT, what="relabel")
    assert registry.pods() == []


async def test_hundred_pods_created_then_deleted_leave_nothing(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    source, registry = await make_source()
    assert await source.wait_synced(10)
    for i in range(100):
        fake.create_pod(
            f"pod-{i}", model=f"model-{i % 7}", ip=f"10.2.{i // 250}.{i % 250}", phase="Running"
        )
        fake.update_pod(f"pod-{i}", ready=True)
    await eventually(lambda: sum(len(v.routable) for v in registry.models().values()) == 100)
    assert len(registry.models()) == 7
    for i in range(100):
        if i % 2:
            fake.mark_terminating(f"pod-{i}")
        fake.delete_pod(f"pod-{i}")
    await eventually(lambda: not registry.pods(), what="all deleted")
    assert registry.models() == {}
    assert lists(fake) == 1  # all of it came through one watch


# -- sync and start-up ------------------------------------------------------------------------


async def test_synced_only_after_first_list(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    fake.go_down("503")
    source, registry = await make_source()
    await eventually(lambda: lists(fake) >= 3, what="retried lists")
    assert not source.synced and not registry.synced and registry.pods() == []

    fake.come_back()
    assert await source.wait_synced(10)
    assert registry.synced
    assert state(registry, "llama") is ModelState.READY


async def test_api_server_down_at_start_then_up(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    fake.go_down("refuse")
    started = time.monotonic()
    source, registry = await make_source()
    await asyncio.sleep(0.5)  # a few backoff rounds against a closed port
    assert not source.synced and registry.pods() == []

    fake.come_back()
    assert await source.wait_synced(10)
    assert state(registry, "llama") is ModelState.READY
    # Backoff is capped (0.3 s here): it came up well within a few caps of the restart.
    assert time.monotonic() - started < 5


async def test_backoff_spaces_out_retries(fake: FakeKubeApiServer, make_source: MakeSource) -> None:
    fake.go_down("503")
    await make_source(backoff_base=0.1, backoff_max=0.4)
    await asyncio.sleep(1.5)
    # Without backoff this would be hundreds; with it, at most about 1.5 / 0.2 + a few.
    assert 2 <= lists(fake) <= 12


# -- the wire breaking ------------------------------------------------------------------------


async def test_dropped_watch_resumes_from_last_resource_version(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    source, registry = await make_source()
    await watching(fake, source)
    fake.update_pod("a", ready=False)
    await eventually(lambda: state(registry, "llama") is ModelState.UNAVAILABLE)
    seen_rv = source.resource_version()

    assert fake.drop_watches() == 1
    fake.create_pod("b", model="llama", ip="10.0.0.2", phase="Running", ready=True)
    await eventually(lambda: state(registry, "llama") is ModelState.READY, what="resumed")
    assert [p.name for p in registry.lookup("llama").routable] == ["b"]
    assert lists(fake) == 1  # no relist: the watch resumed where it stopped
    assert fake.requests(watch=True)[1].query["resourceVersion"] == seen_rv


async def test_pod_deleted_while_down_is_gone_after_relist(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    fake.create_pod("b", model="llama", ip="10.0.0.2", phase="Running")
    source, registry = await make_source()
    await watching(fake, source)
    assert len(registry.pods()) == 2

    fake.go_down("refuse")
    fake.delete_pod("a")
    fake.update_pod("b", ready=True)
    fake.compact()  # the events above are no longer in the history: resuming gets 410
    fake.come_back()

    await eventually(lambda: [p.name for p in registry.pods()] == ["b"], what="relisted")
    assert registry.lookup("llama").routable[0].name == "b"
    assert lists(fake) == 2
    relisted_at = str(fake.resource_version)
    await eventually(
        lambda: fake.requests(watch=True)[-1].query["resourceVersion"] == relisted_at,
        what="watch from the relist's resourceVersion",
    )


async def test_http_410_on_watch_relists(fake: FakeKubeApiServer, make_source: MakeSource) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    source, registry = await make_source()
    await watching(fake, source)
    fake.go_down("refuse")
    fake.gone_as_http = True
    fake.delete_pod("a")
    fake.compact()
    fake.come_back()
    await eventually(lambda: registry.pods() == [], what="relisted after HTTP 410")
    assert lists(fake) == 2
    assert source.synced


async def test_error_410_event_on_open_watch_relists(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    fake.create_pod("b", model="gemma", ip="10.0.0.2", phase="Running", ready=True)
    source, registry = await make_source()
    await watching(fake, source)
    assert len(registry.pods()) == 2
    fake.delete_pod("a", silent=True)  # an event this watcher will never get
    fake.compact(expire_watches=True)
    await eventually(lambda: state(registry, "llama") is ModelState.ABSENT, what="relist")
    assert state(registry, "gemma") is ModelState.READY
    assert lists(fake) == 2


async def test_error_event_other_than_410_relists(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    source, registry = await make_source()
    await watching(fake, source)
    fake.delete_pod("a", silent=True)
    fake.send_garbage(
        b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure",'
        b'"reason":"InternalError","message":"etcd hiccup","code":500}}'
    )
    await eventually(lambda: registry.pods() == [], what="relist after ERROR 500")
    assert lists(fake) == 2


async def test_garbage_line_is_skipped(fake: FakeKubeApiServer, make_source: MakeSource) -> None:
    source, registry = await make_source()
    await watching(fake, source)
    with capture_logs() as logs:
        fake.send_garbage()
        fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
        await eventually(lambda: state(registry, "llama") is ModelState.READY)
    assert [e for e in logs if e["event"] == "kubernetes_bad_watch_event"]
    assert lists(fake) == 1


async def test_bookmark_moves_the_resource_version(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    source, _registry = await make_source()
    await watching(fake, source)
    assert fake.requests(watch=True)[0].query["allowWatchBookmarks"] == "true"
    fake.bump_resource_version(40)  # other objects changed; no pod event carries it
    bookmark = fake.send_bookmark()
    await eventually(lambda: source.resource_version() == str(bookmark), what="bookmark")

    fake.drop_watches()
    await eventually(lambda: len(fake.requests(watch=True)) == 2, what="re-watch")
    assert fake.requests(watch=True)[1].query["resourceVersion"] == str(bookmark)


async def test_periodic_resync_repairs_a_lost_event(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pod("a", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    source, registry = await make_source(resync_period=1.0)
    await watching(fake, source)
    assert int(fake.requests(watch=True)[0].query["timeoutSeconds"]) <= 1
    fake.update_pod("a", ready=False, silent=True)
    await eventually(lambda: state(registry, "llama") is ModelState.UNAVAILABLE, timeout=5)
    assert lists(fake) >= 2


async def test_paged_list(fake: FakeKubeApiServer, make_source: MakeSource) -> None:
    for i in range(23):
        fake.create_pod(f"p-{i:02}", model="llama", ip=f"10.0.0.{i + 1}", phase="Running")
    source, registry = await make_source(list_page_size=5)
    assert await source.wait_synced(10)
    assert len(registry.pods()) == 23
    pages = fake.requests(watch=False)
    assert len(pages) == 5 and all(p.query["limit"] == "5" for p in pages)
    assert "continue" in pages[-1].query


# -- scope, labels, stop ----------------------------------------------------------------------


async def test_namespaces_are_watched_separately(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    for ns in ("team-a", "team-b", "other"):
        fake.create_pod("engine", ns, model="llama", ip="10.0.0.1", phase="Running", ready=True)
    source, registry = await make_source(namespaces=("team-a", "team-b"))
    assert await source.wait_synced(10)
    assert sorted(p.key for p in registry.pods()) == ["team-a/engine", "team-b/engine"]
    paths = {r.path for r in fake.requests()}
    assert paths == {"/api/v1/namespaces/team-a/pods", "/api/v1/namespaces/team-b/pods"}

    # A relist of one namespace must not drop the other namespace's pods.
    fake.delete_pod("engine", "team-a", silent=True)
    fake.compact(expire_watches=True)
    await eventually(lambda: [p.key for p in registry.pods()] == ["team-b/engine"])
    fake.create_pod("engine-2", "team-a", model="llama", ip="10.0.0.2", phase="Running")
    await eventually(lambda: len(registry.pods()) == 2)


async def test_custom_labels_and_bad_port_values(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    labels = {"serving/port": "not-a-port", "serving/metrics": "9000"}
    fake.create_pod(
        "x", model="ignored", labels={**labels, "serving/model": "llama"}, ip="10.0.0.5"
    )
    fake.create_pod("y", model="ignored-too", ip="10.0.0.6")
    with capture_logs() as logs:
        source, registry = await make_source(
            model_label="serving/model",
            port_label="serving/port",
            metric_port_label="serving/metrics",
            default_port=7000,
        )
        assert await source.wait_synced(10)
        fake.update_pod("x", phase="Running")
        await eventually(lambda: registry.pods()[0].ready is False and lists(fake) == 1)
        await eventually(lambda: fake.resource_version == int(source.resource_version() or 0))
    [pod] = registry.pods()
    assert (pod.name, pod.models, pod.address, pod.metrics_address) == (
        "x",
        ("llama",),
        "10.0.0.5:7000",
        "10.0.0.5:9000",
    )
    warnings = [e for e in logs if e["event"] == "kubernetes_bad_port_label"]
    assert len(warnings) == 1  # once, although the pod was seen twice
    assert fake.requests()[0].query["labelSelector"] == "serving/model"


async def test_stop_is_prompt_and_final(fake: FakeKubeApiServer, kubeconfig: Path) -> None:
    registry = ModelRegistry()
    options = KubernetesOptions(kubeconfig=str(kubeconfig), **FAST)
    source = KubernetesSource(registry, asyncio.get_running_loop(), options)
    await source.start()
    assert await source.wait_synced(10)
    await watching(fake, source)
    started = time.monotonic()
    await source.stop(2.0)
    assert not source.running
    assert time.monotonic() - started < 1.0
    fake.create_pod("late", model="llama", ip="10.0.0.1", phase="Running", ready=True)
    await asyncio.sleep(0.2)
    assert registry.pods() == []


async def test_stop_while_api_server_is_down(fake: FakeKubeApiServer, kubeconfig: Path) -> None:
    fake.go_down("refuse")
    options = KubernetesOptions(kubeconfig=str(kubeconfig), backoff_base=5, backoff_max=5)
    source = KubernetesSource(ModelRegistry(), asyncio.get_running_loop(), options)
    await source.start()
    await asyncio.sleep(0.2)  # now waiting out a 5 s backoff
    started = time.monotonic()
    await source.stop(2.0)
    assert not source.running
    assert time.monotonic() - started < 1.0


# -- pieces -----------------------------------------------------------------------------------


def test_mapper_reads_ipv6_ports_and_phases() -> None:
    mapper = PodMapper(KubernetesOptions())
    obj = pod_object("v6", "ns", model="llama", ip="fd00::5", phase="Running", ready=True)
    obj["metadata"]["labels"][METRIC_PORT_LABEL] = "9100"
    pod = mapper(obj)
    assert pod is not None
    assert (pod.key, pod.address, pod.metrics_address) == (
        "ns/v6",
        "[fd00::5]:8000",
        "[fd00::5]:9100",
    )
    assert pod.routable
    assert mapper(pod_object("plain", labels={"app": "web"})) is None
    assert mapper({"kind": "Pod"}) is None and mapper("garbage") is None
    obj["metadata"]["labels"][PORT_LABEL] = "70000"
    assert mapper(obj).address == "[fd00::5]:8000"  # type: ignore[union-attr]


def test_mapper_points_event_streams_at_the_pod_ip_unless_an_annotation_says_otherwise() -> None:
    obj = pod_object("e", "ns", model="llama", ip="10.9.0.7", phase="Running", ready=True)
    assert PodMapper(KubernetesOptions())(obj).kv_events == ""  # type: ignore[union-attr]
    mapper = PodMapper(KubernetesOptions(kv_events_port=5557))
    assert mapper(obj).kv_events == "tcp://10.9.0.7:5557"  # type: ignore[union-attr]
    annotations = obj["metadata"].setdefault("annotations", {})
    annotations[KV_EVENTS_ANNOTATION] = "6000"
    annotations[KV_EVENTS_REPLAY_ANNOTATION] = "6001"
    pod = mapper(obj)
    assert pod is not None
    assert (pod.kv_events, pod.kv_events_replay) == ("tcp://10.9.0.7:6000", "tcp://10.9.0.7:6001")
    annotations[KV_EVENTS_ANNOTATION] = "tcp://events.ns.svc:7000"
    assert mapper(obj).kv_events == "tcp://events.ns.svc:7000"  # type: ignore[union-attr]
    annotations[KV_EVENTS_ANNOTATION] = "off"
    assert mapper(obj).kv_events_replay == ""  # type: ignore[union-attr]
    annotations[KV_EVENTS_ANNOTATION] = "not a port"
    assert mapper(obj).kv_events == "tcp://10.9.0.7:5557"  # type: ignore[union-attr]
    no_ip = pod_object("n", "ns", model="llama", phase="Pending")
    assert mapper(no_ip).kv_events == ""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        {"default_port": 0},
        {"model_label": ""},
        {"backoff_base": 0},
        {"resync_period": -1},
        {"namespaces": "default"},
    ],
)
def test_options_reject_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        KubernetesOptions(**bad)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        (MODEL_LABEL, {MODEL_LABEL: "x"}, True),
        (MODEL_LABEL, {}, False),
        ("!a", {}, True),
        ("a=1,b", {"a": "1", "b": ""}, True),
        ("a==1", {"a": "2"}, False),
        ("a!=1", {}, True),
        ("a in (x, y),b notin (z)", {"a": "y"}, True),
        ("a in (x,y)", {"a": "z"}, False),
        ("", {"anything": "goes"}, True),
    ],
)
def test_fake_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector)(labels) is expected
