"""benchmarks/reproducibility.py's statistics on planted samples: the local ratio sees a change of
the machine's speed that happens within a round, which the per-round ratio pairs across."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproducibility", ROOT / "benchmarks" / "reproducibility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _phase(speed, bases, rounds=20):
    """One round phase: every engine once per round in a fixed order; each sample its engine's
    base time times the machine's speed at its place in the sequence."""
    rows, position = {n: {"samples": [], "rounds": [], "order": []} for n in bases}, 0
    for r in range(rounds):
        for n, base in bases.items():
            rows[n]["samples"].append(base * speed(position))
            rows[n]["rounds"].append(r)
            rows[n]["order"].append(position)
            position += 1
    return pd.DataFrame([{"route": n, "samples_ms": json.dumps(v["samples"]), "rounds": json.dumps(v["rounds"]),
                          "sample_order": json.dumps(v["order"])} for n, v in rows.items()])


def test_local_factors_recover_a_speed_that_moves_within_rounds(repro):
    # the machine slows down 1.5x for stretches of 9 samples in 27, out of step with the rounds of 8 engines
    speed = lambda pos: 1.5 if (pos // 9) % 3 == 0 else 1.0  # noqa: E731
    bases = {f"e{i}": 1.0 + i for i in range(8)}
    phase = _phase(speed, bases)
    factors = repro._local_factors(phase, window=3)
    for i, row in phase.iterrows():
        order = json.loads(row.sample_order)
        planted = np.array([speed(p) for p in order]) / np.median([speed(p) for p in order])
        inside = [k for k, p in enumerate(order) if speed(p - 3) == speed(p) == speed(p + 3)]  # away from a step
        assert any(planted[inside] == 1.5)  # slow samples among them: not just the default 1.0
        assert factors[i][inside] == pytest.approx(planted[inside])


def test_local_factors_are_one_where_no_order_was_stored(repro):
    phase = _phase(lambda pos: 1.0 + pos % 2, {"a": 1.0, "b": 2.0}).drop(columns="sample_order")
    factors = repro._local_factors(phase)
    assert all((f == 1.0).all() for f in factors.values())
