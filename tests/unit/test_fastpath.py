"""Fast paths are a capability a scorer declares (`fastpath`): the max-score picker's
shortcuts they allow must pick exactly what the plain path picks, with the same random
draws, and a scorer that declares none must route through the plain path, correctly.

The reference in every comparison is the same profile built from the same scorers
wrapped so that they declare no capability (`Plain`): it scores every pod, every
decision, from scratch."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing import fastpath
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.fastpath import (
    Fused,
    Lowered,
    LowestLoad,
    Shortcut,
    Shortlisted,
    SparseOnly,
)
from gateway_extproc.routing.pickers import MaxScorePicker
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext
from gateway_extproc.routing.profile import Profile
from gateway_extproc.routing.registry import PLUGINS, PluginRegistry
from tests.unit.test_scorers import Fleet, live_scrape, varied_fleet


class Plain(Scorer):
    """The same scores as `inner`, with no capability declared."""

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.name = inner.name
        self.partial_without_metrics = inner.partial_without_metrics  # type: ignore[misc]

    def score(self, ctx: ScoringContext) -> Scores:
        return self.inner.score(ctx)

    def picked(self, position: int, ctx: ScoringContext) -> None:
        self.inner.picked(position, ctx)


def plain_plugins() -> PluginRegistry:
    """The built-in plugins, every scorer wrapped in `Plain`."""
    plugins = PLUGINS.copy()
    for name, factory in list(plugins.scorers.items()):

        def plain(env: Any, _factory: Callable[..., Scorer] = factory, **params: Any) -> Scorer:
            return Plain(_factory(env, **params))

        plugins.register_scorer(name, plain, replace=True)
    return plugins


def picker_of(fleet: Fleet, name: str) -> MaxScorePicker:
    profile = fleet.catalog.resolve(name)
    assert isinstance(profile, Profile)
    assert isinstance(profile.picker, MaxScorePicker)
    return profile.picker


def count_shortcut(picker: MaxScorePicker) -> list[int]:
    """Counts (in the one item of the list returned) the picks the picker's shortcut
    made rather than leave to the plain path."""
    taken = [0]
    shortcut = picker.shortcut
    assert shortcut is not None
    pick = shortcut.pick

    def counted(ctx: ScoringContext) -> int:
        chosen = pick(ctx)
        taken[0] += chosen >= 0
        return chosen

    shortcut.pick = counted  # type: ignore[method-assign]
    return taken


def forget_kept_state(picker: MaxScorePicker) -> None:
    """Nothing kept from one decision to the next: the reference scores from scratch."""
    for kept in picker._signals._sets.values():
        kept.view = kept.book = None


SHORTCUTS: dict[str, type[Shortcut]] = {
    "least-kv-cache": Fused,
    "throughput": Fused,
    "least-latency": Lowered,
    "prefix-cache": SparseOnly,
    "least-request": LowestLoad,
    "prefix-cache:3,least-kv-cache:2,least-request:2": Fused,
    "least-kv-cache:1,prefix-cache:1,least-request:3": Fused,
    "throughput:1,least-kv-cache:1,least-request:1": Fused,
    "least-request:1,least-kv-cache:1": Shortlisted,
    "least-kv-cache:1": Shortlisted,
}


@pytest.mark.parametrize(("name", "kind"), SHORTCUTS.items())
def test_capabilities_choose_the_shortcut_once_and_plain_scorers_take_none(
    name: str, kind: type[Shortcut]
) -> None:
    assert isinstance(picker_of(Fleet(3), name).shortcut, kind)
    assert picker_of(Fleet(3, plugins=plain_plugins()), name).shortcut is None


@pytest.mark.parametrize("name", SHORTCUTS)
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("spread", "max_groups"),
    [
        (False, fastpath._MAX_GROUPS),  # few distinct loads: the fused pick walks groups
        (True, 8),  # loads 0..100 on 40 pods, more groups than allowed: it makes passes
        (True, 1000),  # or walks groups, loads above the pod count too
    ],
)
@pytest.mark.parametrize("live", [False, True])
def test_fast_paths_pick_as_the_plain_path(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    seed: int,
    spread: bool,
    max_groups: int,
    live: bool,
) -> None:
    """The shortcuts (taken once per decision when they apply), with what they keep
    updated pod by pod as scrapes land, choose the same pods, drawing the same random
    numbers, as the same scorers without capabilities, which keep nothing from one
    decision to the next. Scrapes land rarely, or (live) before every decision."""
    monkeypatch.setattr(fastpath, "_MAX_GROUPS", max_groups)
    fast, full = varied_fleet(seed), varied_fleet(seed, plugins=plain_plugins())
    if spread:
        for pod in fast.pods:
            for _ in range(random.Random(pod.name).randint(0, 100)):
                for f in (fast, full):
                    f.inflight.acquire("m", pod)
    fast_strategy = fast.catalog.resolve(name)
    full_strategy = full.catalog.resolve(name)
    assert fast_strategy is not None and full_strategy is not None
    taken = count_shortcut(picker_of(fast, name))
    full_picker = picker_of(full, name)
    prompts = [f"system prompt {k % 3} " * 20 + f"user {k}" for k in range(12)]
    rng = random.Random(seed)
    for i in range(300):
        request = RoutingRequest(model="m", prompt=prompts[i % len(prompts)])
        forget_kept_state(full_picker)
        picked = [
            s.rank(f.pods, request, 1)[0] for s, f in ((fast_strategy, fast), (full_strategy, full))
        ]
        assert picked[0].name == picked[1].name, i
        for f in (fast, full):
            f.inflight.acquire("m", picked[0])
        if rng.random() < 0.4:  # some finish, so loads go down as well as up
            pod = fast.pods[rng.randrange(len(fast.pods))]
            for f in (fast, full):
                f.inflight.release("m", pod)
        if live:
            live_scrape((fast, full), rng, i)
        elif i % 100 == 99:  # a scrape: the per-scrape vectors must follow
            pod = fast.pods[i % len(fast.pods)]
            for f in (fast, full):
                f.set(pod, kv=0.01, ttft=0.02, tps=5.0)
    if live and not spread:  # (heavy loads keep the latency shortcut out of play)
        assert taken[0] > 5  # shortcuts on kept state were tested, not only full ranking


def test_latency_fast_path_is_taken_and_agrees() -> None:
    """With engines running more than we have in flight, most decisions only lower a
    few scores: the fast path decides them, as the plain path would."""
    fast, full = varied_fleet(9, running=30), varied_fleet(9, running=30, plugins=plain_plugins())
    fast_strategy, full_strategy = (f.catalog.resolve("least-latency") for f in (fast, full))
    assert fast_strategy is not None and full_strategy is not None
    taken = count_shortcut(picker_of(fast, "least-latency"))
    request = RoutingRequest(model="m")
    previous: Pod | None = None
    for i in range(300):
        picked = [
            s.rank(f.pods, request, 1)[0] for s, f in ((fast_strategy, fast), (full_strategy, full))
        ]
        assert picked[0].name == picked[1].name, i
        for f in (fast, full):  # one more in flight, the previous one done
            f.inflight.acquire("m", picked[0])
            if previous is not None:
                f.inflight.release("m", previous)
        previous = picked[0]
    assert taken[0] > 150


class Busy(Scorer):
    """A scorer of its own, declaring nothing: the fewer running requests, the better."""

    name = "fewest-running"

    def score(self, ctx: ScoringContext) -> Scores:
        running = [None if m is None or m.running is None else m.running for m in ctx.metrics()]
        top = max((r for r in running if r is not None), default=0) or 1
        return [None if r is None else 1.0 - r / top for r in running]


def test_a_scorer_without_capabilities_routes_through_the_plain_path() -> None:
    """Alone or beside scorers that have fast paths, it gets no shortcut that could not
    hold for it, and its scores decide the picks."""
    plugins = PLUGINS.copy()
    plugins.register_scorer("fewest-running", lambda env: Busy())
    fleet = Fleet(4, plugins=plugins)
    fleet.warm(running=10, waiting=0)
    fleet.set(fleet.pods[2], running=1, waiting=0)
    for name in ("fewest-running:1", "fewest-running:3,least-request:1"):
        picker = picker_of(fleet, name)
        assert picker.shortcut is None
        strategy: Strategy | None = fleet.catalog.resolve(name)
        assert strategy is not None
        picks = {strategy.rank(fleet.pods, RoutingRequest("m"), 1)[0].name for _ in range(20)}
        assert picks == {"p2"}, name
