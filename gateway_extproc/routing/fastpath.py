"""Fast paths of the max-score picker: capabilities a scorer declares, and the shortcuts
they allow.

On a large fleet scoring every pod every decision is the routing cost. A scorer that
knows more about the shape of its scores declares it by subclassing one or more of the
capabilities below, next to `plugins.Scorer`:

- `PerScrape`: its scores depend on engine metrics alone, so one column, updated pod by
  pod as scrapes land, serves every decision;
- `Partial`: it can score a few positions only (and always has data);
- `Affine`: its score is an affine function of each pod's load (higher load, lower score);
- `Lowering`: live inputs can only lower some scores below the per-scrape ones, and it
  can find the pods within a tolerance of the best without scoring every pod;
- `Sparse`: it always has data and scores 0.0 for all but a few pods.

When a max-score profile is built, `shortcut_for` looks at its scorers' capabilities
once and picks at most one shortcut for single picks (no fallback endpoints). A
shortcut makes the pick the plain path would make, with the same random draws, or says
-1 and leaves the decision to the plain path (pods without data or in slow start,
whose random shares only the plain path draws). Shortcuts:

- `Fused`: the last scorer is `Affine` (the load term) and the others are `PerScrape` or
  `Sparse`: a pod's combined score is a per-scrape partial sum plus a term of its load,
  so pods at one load rank in an order only scrapes change, and only the leading pods
  of each load's group are looked at (weighted combinations ending in least-request,
  and least-kv-cache and throughput with their burst-spread term);
- `Shortlisted`: some scorers are `PerScrape` and the rest `Partial`: bounds computed per
  scrape rule out the pods that cannot come within the tolerance of the best, and only
  the rest are scored;
- `Lowered`: a single `Lowering` scorer (least-latency);
- `SparseOnly`: a single `Sparse` scorer (prefix-cache);
- `LowestLoad`: a single `Affine` scorer that is also the tie-breaker (least-request):
  the pick is among the least loaded pods, which the load book keeps grouped.

tests/unit/test_fastpath.py proves each picks exactly what the plain path picks.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from itertools import compress, repeat
from operator import add, ge

from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext, WeightedScorers
from gateway_extproc.routing.signals import PodSignals

# Below every real score (0..1): marks pods that do not compete on score.
OUT = -1.0
# More distinct loads than this among the candidates, and `Fused` makes C-level passes
# over every pod rather than walk each load's group in Python.
_MAX_GROUPS = 48
# Above every score a scorer can return (1, give or take rounding): the upper bound used
# to rule pods out before scoring them.
_ABOVE_ONE = 1.0 + 1e-9

# The picker's tie-break among positions tied on score: (tied, ctx, the tie-breaker's
# scores at `tied` when the caller has them) -> the chosen position.
BreakTie = Callable[[list[int], ScoringContext, Scores | None], int]


# -- capabilities ---------------------------------------------------------------------------


class PerScrape(ABC):
    """A scorer whose scores depend on engine metrics alone (not on the request or on
    in-flight counts), so one column serves every decision, changed only by scrapes."""

    @abstractmethod
    def column(self, ctx: ScoringContext) -> Scores:
        """The shared column: never change it. It is the same list from decision to
        decision while a scrape changes only the scores of the pods scraped; when one
        changes the others' too, it is a new list."""


class Partial(ABC):
    """A scorer that can score some of the candidates only, and always has data."""

    @abstractmethod
    def score_at(self, ctx: ScoringContext, positions: list[int]) -> list[float]:
        """Exactly `score(ctx)` at these positions, none of them None."""


class Affine(ABC):
    """A scorer whose score is an affine function of each pod's load, lower for a
    higher load (all 1.0 when every load is the same)."""

    @abstractmethod
    def affine(self, ctx: ScoringContext) -> tuple[int, float] | None:
        """(hi, inv): score = (hi - load) * inv for every pod; None: all 1.0."""

    @abstractmethod
    def by_load(self, ctx: ScoringContext) -> list[float] | None:
        """The same scores indexed by load, or None (then use `affine`)."""


class Lowering(ABC):
    """A scorer whose live inputs can only lower some scores below the per-scrape ones."""

    @abstractmethod
    def near(self, ctx: ScoringContext, tolerance: float) -> list[int] | None:
        """Positions (ascending) of the pods whose `score` is within `tolerance` of the
        best, or None when some pod has no data (then use `score`)."""


class Sparse(ABC):
    """A scorer that always has data and scores 0.0 but for a few pods."""

    @abstractmethod
    def sparse(self, ctx: ScoringContext) -> dict[int, float]:
        """Position -> score of the pods that do not score 0.0."""


# -- shortcuts ------------------------------------------------------------------------------


class Shortcut:
    """A single pick the plain path would make, found without scoring every pod. Every
    shortcut leaves the decision to the plain path while pods are in slow start: their
    random shares are drawn there."""

    def __init__(self, signals: PodSignals) -> None:
        self._signals = signals

    def pick(self, ctx: ScoringContext) -> int:
        """The position the plain path would pick, or -1: rank in full."""
        raise NotImplementedError


def shortcut_for(
    weighted: WeightedScorers,
    signals: PodSignals,
    rng: random.Random,
    *,
    tolerance: float,
    tiebreak: Scorer | None,
    tiebreak_column: int,
    break_tie: BreakTie,
) -> Shortcut | None:
    """The shortcut these scorers' capabilities allow, if any (looked at once, when the
    profile is built)."""
    scorers = weighted.scorers
    per_scrape = tuple(s if isinstance(s, PerScrape) else None for s in scorers)
    partial = tuple(s if isinstance(s, Partial) else None for s in scorers)
    sparse = tuple(s if isinstance(s, Sparse) else None for s in scorers)
    last = scorers[-1] if isinstance(scorers[-1], Affine) else None
    if (
        last is not None
        and len(scorers) > 1
        and all(
            a is not None or b is not None
            for a, b in zip(per_scrape[:-1], sparse[:-1], strict=True)
        )
    ):
        return Fused(weighted, signals, last, per_scrape, sparse, tolerance, break_tie)
    if any(per_scrape) and all(
        a is not None or b is not None for a, b in zip(per_scrape, partial, strict=True)
    ):
        return Shortlisted(
            weighted, signals, per_scrape, partial, tolerance, tiebreak_column, break_tie
        )
    if len(scorers) == 1:
        only = scorers[0]
        if isinstance(only, Lowering):
            return Lowered(signals, only, tolerance, break_tie)
        if sparse[0] is not None:
            return SparseOnly(signals, sparse[0], tolerance, break_tie)
        if last is not None and only is tiebreak:
            return LowestLoad(signals, rng)
    return None


class _ShortlistState:
    """Per scrape: the pods that can still come within the tolerance of the best,
    whatever the live scorers say (None when some pod has no data: full ranking then),
    and the per-scrape scorers' columns at those positions."""

    __slots__ = ("columns", "positions")

    def __init__(self, positions: list[int] | None, columns: list[Scores | None]) -> None:
        self.positions = positions
        self.columns = columns


class Shortlisted(Shortcut):
    """Scores only the pods per-scrape bounds could not rule out.

    Same scores, same tie-break, same draws from the RNG as the full ranking: every
    score is in 0..1, so a pod whose combined score with every live scorer at 1 stays
    below (another pod's score with them at 0) - tolerance can neither be the best nor
    tie with it.
    """

    def __init__(
        self,
        weighted: WeightedScorers,
        signals: PodSignals,
        per_scrape: tuple[PerScrape | None, ...],
        partial: tuple[Partial | None, ...],
        tolerance: float,
        tiebreak_column: int,
        break_tie: BreakTie,
    ) -> None:
        super().__init__(signals)
        self._weighted = weighted
        self._per_scrape = per_scrape
        self._partial = partial
        self._tolerance = tolerance
        self._tiebreak_column = tiebreak_column
        self._break_tie = break_tie

    def pick(self, ctx: ScoringContext) -> int:
        shortlist: _ShortlistState = ctx.per_scrape(self, lambda _: self._shortlist(ctx))
        positions = shortlist.positions
        if positions is None or self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        columns: list[Scores] = [
            column if column is not None else partial.score_at(ctx, positions)  # type: ignore[union-attr,misc]
            for column, partial in zip(shortlist.columns, self._partial, strict=True)
        ]
        values: list[float] = self._weighted.combine(columns)  # type: ignore[assignment]
        cut = max(values) - self._tolerance
        tied = [positions[k] for k in compress(range(len(values)), map(ge, values, repeat(cut)))]
        found: Scores | None = None
        j = self._tiebreak_column
        if j >= 0 and len(tied) > 1:
            per_scrape = self._per_scrape[j]
            if per_scrape is not None:
                found = list(map(per_scrape.column(ctx).__getitem__, tied))
            else:
                found = self._partial[j].score_at(ctx, tied)  # type: ignore[union-attr,assignment]
        return self._break_tie(tied, ctx, found)

    def _shortlist(self, ctx: ScoringContext) -> _ShortlistState:
        columns = [s.column(ctx) if s is not None else None for s in self._per_scrape]
        if any(None in c for c in columns if c is not None):
            return _ShortlistState(None, [])
        n = len(ctx.candidates.keys)
        # Bounds on each pod's combined score, computed as `combine` computes it (same
        # order of operations, so rounding cannot break them).
        zeros: Scores = [0.0] * n
        ones: Scores = [_ABOVE_ONE] * n
        combine = self._weighted.combine
        lower: list[float] = combine([zeros if c is None else c for c in columns])  # type: ignore[assignment]
        upper: list[float] = combine([ones if c is None else c for c in columns])  # type: ignore[assignment]
        cut = max(lower) - self._tolerance
        positions = list(compress(range(n), map(ge, upper, repeat(cut))))
        return _ShortlistState(
            positions,
            [None if c is None else [c[i] for i in positions] for c in columns],
        )


class _FusedState:
    """Per candidate set: each pod's weighted sum of every scorer but the last (sparse
    scorers at 0) and the columns it was summed from; once it has served a decision,
    also each position's sort key, (-sum, position): ascending keys put the pods best
    first, as a stable sort by sum would."""

    __slots__ = ("base", "columns", "decisions", "keys")

    def __init__(self, base: list[float], columns: list[Scores]) -> None:
        self.base = base
        self.columns = columns
        self.decisions = 0
        self.keys: list[tuple[float, int]] = []

    def ordered(self) -> list[tuple[float, int]]:
        if not self.keys:
            self.keys = [(-value, i) for i, value in enumerate(self.base)]
        return self.keys


class Fused(Shortcut):
    """The pick without a pass over the candidates.

    Same floats as `combine`: a pod's combined score is (its weighted sum of the other
    scorers, left to right) + w * ((hi - load) * inv), and that sum is per-scrape
    (`base`) for every pod but the few the sparse scorers score above 0. So pods at one
    load score in `base` order, which only scrapes change (a pod's key moves when its sum
    does): with the candidates grouped by load in that order (`LoadBook.grouped`), the
    best score is among the groups' heads, and the pods within tolerance of it are the
    leading run of each group.
    """

    def __init__(
        self,
        weighted: WeightedScorers,
        signals: PodSignals,
        affine: Affine,
        per_scrape: tuple[PerScrape | None, ...],
        sparse: tuple[Sparse | None, ...],
        tolerance: float,
        break_tie: BreakTie,
    ) -> None:
        super().__init__(signals)
        self._weighted = weighted
        self._affine = affine
        self._per_scrape = per_scrape[:-1]
        self._sparse = sparse[:-1]
        self._tolerance = tolerance
        self._break_tie = break_tie
        self._w = weighted.weights[-1] / weighted.total

    def pick(self, ctx: ScoringContext) -> int:
        fused: _FusedState | None = ctx.per_scrape(
            self,
            lambda _: self._base(ctx),
            lambda found, _, at: self._update(ctx, found, at),  # type: ignore[arg-type]
        )
        if fused is None or self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        w = self._w
        affine = self._affine.affine(ctx)
        fused.decisions += 1
        if fused.decisions == 1 or len(ctx.book().groups) > _MAX_GROUPS:
            # Ordering and grouping the pods cost a few passes: worth it only from the
            # second decision on these sums (they are rebuilt when many pods changed).
            return self._pass(ctx, fused.base, w, affine)
        base = fused.base
        groups = ctx.book().grouped(self, fused.ordered())
        if affine is None:
            terms = dict.fromkeys(groups, w * 1.0)
        else:
            hi, inv = affine
            terms = {load: w * ((hi - load) * inv) for load in groups}
        touched = self._touched(ctx, affine)
        best = max(touched.values(), default=OUT)
        for load, keys in groups.items():
            for _, i in keys:
                if i not in touched:  # touched pods have their own score, counted above
                    best = max(best, base[i] + terms[load])
                    break
        cut = best - self._tolerance
        tied = [i for i, value in touched.items() if value >= cut]
        for load, keys in groups.items():
            term = terms[load]
            for _, i in keys:
                if base[i] + term < cut:
                    break  # and so is every later pod in this group
                if i not in touched:
                    tied.append(i)
        tied.sort()
        return self._break_tie(tied, ctx, None)

    def _pass(
        self, ctx: ScoringContext, base: list[float], w: float, affine: tuple[int, float] | None
    ) -> int:
        """The pick in C-level passes over every candidate: cheaper on a scrape view's
        first decision, and when loads are so spread that there are more groups than a
        group walk can afford."""
        loads = ctx.loads()
        by_load = self._affine.by_load(ctx)
        if by_load is not None:
            # w * score for each load value, then a C-level lookup and add per pod.
            term = [w * q for q in by_load]
            values = list(map(add, base, map(term.__getitem__, loads)))
        elif affine is None:
            values = [a + w * 1.0 for a in base]
        else:
            hi, inv = affine
            values = [a + w * ((hi - x) * inv) for a, x in zip(base, loads, strict=True)]
        for i, value in self._touched(ctx, affine).items():
            values[i] = value
        cut = max(values) - self._tolerance
        tied = list(compress(range(len(values)), map(ge, values, repeat(cut))))
        return self._break_tie(tied, ctx, None)

    def _touched(self, ctx: ScoringContext, affine: tuple[int, float] | None) -> dict[int, float]:
        """Position -> combined score of the pods some sparse scorer scores above 0."""
        touched: dict[int, None] = {}
        found: list[dict[int, float] | None] = []
        for sparse in self._sparse:
            column = sparse.sparse(ctx) if sparse is not None else None
            found.append(column)
            if column:
                touched.update(dict.fromkeys(column))
        out: dict[int, float] = {}
        loads = ctx.loads()
        for i in touched:
            terms = [
                column.get(i, 0.0) if column is not None else per_scrape.column(ctx)[i]  # type: ignore[union-attr]
                for column, per_scrape in zip(found, self._per_scrape, strict=True)
            ]
            q = 1.0 if affine is None else (affine[0] - loads[i]) * affine[1]
            out[i] = self._weighted.weighted_sum([*terms, q])  # type: ignore[list-item]
        return out

    def _base(self, ctx: ScoringContext) -> _FusedState | None:
        """Per pod, the weighted sum of all scorers but the last, sparse ones at 0."""
        n = len(ctx.candidates.keys)
        zeros: Scores = [0.0] * n
        columns = [zeros if s is None else s.column(ctx) for s in self._per_scrape]
        if any(None in c for c in columns):
            return None
        weights = self._weighted.normalised
        out: list[float] = [weights[0] * a for a in columns[0]]  # type: ignore[operator]
        for column, wk in zip(columns[1:], weights[1:], strict=False):
            out = [a + wk * b for a, b in zip(out, column, strict=True)]  # type: ignore[operator]
        return _FusedState(out, columns)

    def _update(self, ctx: ScoringContext, fused: _FusedState, at: list[int]) -> bool:
        """Sum again at `at`, with `_base`'s order of operations (same floats), and move
        those pods' keys; False when a column is a new list (many scores moved) or a pod
        lost data."""
        columns = fused.columns
        for s, column in zip(self._per_scrape, columns, strict=True):
            if s is not None and s.column(ctx) is not column:
                return False
        rows = [[column[i] for column in columns] for i in at]
        if any(None in row for row in rows):
            return False
        weights = self._weighted.normalised
        base, keys = fused.base, fused.keys
        book = ctx.book() if keys else None
        for i, row in zip(at, rows, strict=True):
            value = weights[0] * row[0]  # type: ignore[operator]
            for term, wk in zip(row[1:], weights[1:], strict=False):
                value = value + wk * term  # type: ignore[operator]
            base[i] = value
            if book is not None and keys[i][0] != -value:
                old, keys[i] = keys[i], (-value, i)
                book.rekey(self, keys, i, old)
        return True


class Lowered(Shortcut):
    """The pick from the few pods the scorer finds within tolerance of the best without
    scoring every pod."""

    def __init__(
        self, signals: PodSignals, scorer: Lowering, tolerance: float, break_tie: BreakTie
    ) -> None:
        super().__init__(signals)
        self._scorer = scorer
        self._tolerance = tolerance
        self._break_tie = break_tie

    def pick(self, ctx: ScoringContext) -> int:
        if self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        tied = self._scorer.near(ctx, self._tolerance)
        if tied is None:
            return -1  # pods without data: the full ranking draws for them
        return self._break_tie(tied, ctx, None)


class SparseOnly(Shortcut):
    """The pick when one sparse scorer scores every pod 0.0 but a few: only those few
    can beat the rest."""

    def __init__(
        self, signals: PodSignals, scorer: Sparse, tolerance: float, break_tie: BreakTie
    ) -> None:
        super().__init__(signals)
        self._scorer = scorer
        self._tolerance = tolerance
        self._break_tie = break_tie

    def pick(self, ctx: ScoringContext) -> int:
        if self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        scored = self._scorer.sparse(ctx)
        cut = max(scored.values(), default=0.0) - self._tolerance
        if cut <= 0.0:  # 0.0 is within tolerance: every pod is tied
            tied = list(range(len(ctx.candidates.keys)))
        else:
            tied = sorted(i for i, score in scored.items() if score >= cut)
        return self._break_tie(tied, ctx, None)


class LowestLoad(Shortcut):
    """The pick of a single load scorer that also breaks ties: its best scores are the
    least loaded pods' (whatever the tolerance, the tie-break on the same scores keeps
    exactly those), which the load book keeps grouped, in position order: no pass over
    the candidates. Then one at random, as the tie-break draws."""

    def __init__(self, signals: PodSignals, rng: random.Random) -> None:
        super().__init__(signals)
        self._rng = rng

    def pick(self, ctx: ScoringContext) -> int:
        if self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        groups = ctx.book().groups
        tied = groups[min(groups)]
        return tied[self._rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
