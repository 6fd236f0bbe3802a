"""Model states derived from pods, change events, and cleanup on deletion."""

from __future__ import annotations

from gateway_extproc.models.registry import ModelRegistry, ModelState, Pod


def pod(name: str, model: str = "m", **kw) -> Pod:
    return Pod(name, f"10.0.0.{len(name)}:8000", (model,), **kw)


def test_states_follow_the_pod_lifecycle_and_each_change_is_reported_once():
    registry = ModelRegistry()
    changes: list[tuple[str, str, str]] = []
    registry.on_model_change(lambda m, old, new: changes.append((m, old.value, new.value)))
    registry.upsert_pod(pod("a", ready=False))
    assert registry.lookup("m").state is ModelState.UNAVAILABLE
    registry.upsert_pod(pod("a"))
    registry.upsert_pod(pod("a"))  # no change, no event
    assert registry.lookup("m").state is ModelState.READY
    registry.upsert_pod(pod("a", terminating=True))
    assert registry.lookup("m").state is ModelState.TERMINATING
    registry.delete_pod("a")
    assert registry.lookup("m").state is ModelState.ABSENT
    assert changes == [
        ("m", "absent", "unavailable"),
        ("m", "unavailable", "ready"),
        ("m", "ready", "terminating"),
        ("m", "terminating", "absent"),
    ]
    assert registry.models() == {}


def test_one_terminating_pod_of_two_leaves_the_model_ready_with_one_routable():
    registry = ModelRegistry()
    registry.replace_all([pod("a"), pod("bb")])
    registry.upsert_pod(pod("bb", terminating=True))
    view = registry.lookup("m")
    assert view.state is ModelState.READY
    assert [p.name for p in view.routable] == ["a"]


def test_not_ready_and_terminating_mix_is_unavailable_not_terminating():
    registry = ModelRegistry()
    registry.replace_all([pod("a", ready=False), pod("bb", terminating=True)])
    assert registry.lookup("m").state is ModelState.UNAVAILABLE


def test_pod_without_address_is_not_routable():
    registry = ModelRegistry()
    registry.upsert_pod(Pod("a", "", ("m",)))
    assert registry.lookup("m").state is ModelState.UNAVAILABLE


def test_a_pod_serving_several_models_moves_all_of_them():
    registry = ModelRegistry()
    registry.upsert_pod(Pod("a", "10.0.0.1:8000", ("base", "lora-1")))
    assert registry.lookup("lora-1").state is ModelState.READY
    registry.upsert_pod(Pod("a", "10.0.0.1:8000", ("base",)))
    assert registry.lookup("lora-1").state is ModelState.ABSENT
    assert registry.lookup("base").state is ModelState.READY


def test_replace_all_deletes_what_vanished_and_tells_listeners():
    registry = ModelRegistry()
    removed: list[str] = []
    registry.on_pod_removed(lambda p: removed.append(p.key))
    registry.replace_all([pod("a"), pod("bb", "other")])
    assert not removed
    registry.replace_all([pod("a")])
    assert removed == ["bb"]
    assert registry.lookup("other").state is ModelState.ABSENT
    assert registry.synced


def test_pick_time_check_sees_the_live_pod_not_the_snapshot():
    registry = ModelRegistry()
    registry.replace_all([pod("a")])
    snapshot = registry.lookup("m").routable[0]
    assert registry.is_routable(snapshot, "m")
    registry.upsert_pod(pod("a", terminating=True))
    assert not registry.is_routable(snapshot, "m")
    registry.delete_pod("a")
    assert not registry.is_routable(snapshot, "m")


def test_thousands_of_pods_created_and_deleted_leave_nothing_behind():
    registry = ModelRegistry()
    pods = [Pod(f"p{i}", f"10.1.{i // 250}.{i % 250}:8000", (f"m{i % 7}",)) for i in range(2000)]
    for p in pods:
        registry.upsert_pod(p)
    assert len(registry.lookup("m3").routable) == len([p for p in pods if "m3" in p.models])
    for p in pods:
        registry.delete_pod(p.key)
    assert registry.models() == {}
    assert registry.pods() == []
    assert registry._keys_by_model == {}
