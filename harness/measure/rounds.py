"""One round phase: the checked engines of a phase timed together, the same way for every phase.

Contract
--------
``RoundPhase(name, protocol, timer, seed=0, shuffle=True, record_drift=None)`` is what every phase of a
run (static sweep, Table 2, dynamic engine, gate retraining) times through; none of them calls
:func:`harness.measure.protocol.measure_rounds` itself.

- ``add(key, result, timed)`` enters one engine: ``result`` is what
  :func:`harness.measure.pipeline.trial` returned (compiled and checked), ``timed(result)`` returns
  ``(fn, result)``: the zero-argument callable the protocol times and the result it belongs to
  (e.g. with a ``cuda_graph`` detail, :func:`harness.measure.pipeline.timed_call`). A result that is
  not ``ok`` is returned as it is and never timed; a ``timed`` that raises makes it
  ``measure_failed``. ``add_call(key, fn)`` enters a plain callable (a dispatcher, a chain's part)
  with no pipeline result of its own. ``add`` returns the entered result (the caller stores a
  failure at once). ``number=`` fixes an engine's calls per sample (a chunk of a stream of routes,
  so that a sample's mean is the stream's and the median over samples estimates it robustly);
  ``primed=True``: each sample follows one untimed call of the same engine (its steady state, as a
  process serving it alone runs it; the others are timed after whatever the round ran before them).
- ``group(keys)``: entered keys that keep their given order within every round (the parts of one
  dynamic chain, timed in context); groups and the remaining single engines are shuffled each round
  with the phase's seed (``shuffle=False``: every round in the order entered).
- ``measure(on_round=None, earlier=None)`` runs the rounds with the phase's protocol (after
  ``earlier``'s, the same phase's measurements from another process, pooled in), gives the rounds' speed
  factors to ``record_drift(name, factors)`` (the run's drift, stored per phase) and returns
  ``{key: result}``: every entered engine with its ``measurement``, or, when timing raised, every
  one ``measure_failed`` with that error. ``phase.rounds`` keeps the
  :class:`~harness.measure.protocol.Rounds` (paired ratios, drift-corrected statistics).

A result's stored columns come from :meth:`harness.measure.pipeline.Result.row` (statistics through
:func:`harness.measure.pipeline.stats_row`), for every phase alike.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from harness.backends.base import one_line
from harness.measure.pipeline import Result
from harness.measure.protocol import Protocol, Rounds, Timer, measure_rounds


class RoundPhase:
    def __init__(self, name: str, protocol: Protocol, timer: Timer | None = None, seed: int = 0,
                 shuffle: bool = True, record_drift: Callable[[str, list[float]], None] | None = None):
        self.name, self.protocol, self.timer, self.seed, self.shuffle = name, protocol, timer, seed, shuffle
        self.record_drift = record_drift
        self.entered: dict[Hashable, Result] = {}
        self.fns: dict[Hashable, Callable[[], object]] = {}
        self.groups: list[list[Hashable]] = []
        self.numbers: dict[Hashable, int] = {}
        self.primed: set[Hashable] = set()
        self.rounds: Rounds | None = None

    def __len__(self) -> int:
        return len(self.fns)

    def __contains__(self, key) -> bool:
        return key in self.fns

    def add(self, key: Hashable, result: Result, timed: Callable[[Result], tuple[Callable[[], object], Result]],
            number: int | None = None, primed: bool = False) -> Result:
        """Enter ``result`` (see the module docstring); returns it, or its ``measure_failed`` copy.
        ``number``: calls per sample, fixed (default: the protocol's choice); ``primed``: each sample
        after an untimed call of its own."""
        if key in self.fns:
            raise ValueError(f"round phase {self.name}: {key!r} entered twice")
        if not result.ok:
            return result
        try:
            fn, result = timed(result)
        except Exception as e:  # e.g. an input the engine cannot take: recorded, never timed
            return result.replace(status="measure_failed", error=one_line(e))
        self.entered[key], self.fns[key] = result, fn
        if number is not None:
            self.numbers[key] = int(number)
        if primed:
            self.primed.add(key)
        return result

    def add_call(self, key: Hashable, fn: Callable[[], object], number: int | None = None,
                 primed: bool = False) -> None:
        """Enter a callable that has no pipeline result of its own (its parts were checked)."""
        self.add(key, Result("ok"), lambda r: (fn, r), number, primed)

    def group(self, keys) -> None:
        """``keys`` (entered) keep this order within every round."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self.fns]
        grouped = {k for g in self.groups for k in g}
        if unknown or grouped & set(keys):
            raise ValueError(f"round phase {self.name}: group of keys not entered or already grouped: "
                             f"{unknown or sorted(map(str, grouped & set(keys)))}")
        self.groups.append(keys)

    def measure(self, on_round: Callable[[int, int], None] | None = None,
                earlier: dict | None = None) -> dict[Hashable, Result]:
        """Time every entered engine in rounds; see the module docstring. ``earlier``: the same
        phase's measurements from another process, pooled in (``measure_rounds``)."""
        if not self.fns:
            return {}
        group_of = {k: g for g in self.groups for k in g}
        units = [group_of.get(k, [k]) for k in self.fns if k not in group_of or group_of[k][0] == k]
        try:
            self.rounds = measure_rounds(self.fns, self.protocol, self.timer, seed=self.seed, shuffle=self.shuffle,
                                         on_round=on_round, groups=units, numbers=self.numbers, earlier=earlier,
                                         primed=self.primed)
        except Exception as e:  # recorded for every engine of the phase; the run goes on
            return {k: r.replace(status="measure_failed", error=one_line(e)) for k, r in self.entered.items()}
        if self.record_drift is not None:
            self.record_drift(self.name, self.rounds.factors)
        return {k: r.replace(measurement=self.rounds[k]) for k, r in self.entered.items()}
