"""The latency lookup table of a dynamic model on one target and backend.

Contract
--------
The LUT is compositional and prices what is deployed: ``dynamic.csv`` holds the measured latency
of the deployment head (fixed layers plus the first gate) and of every segment of ``dsnet.split``
(rows of kind ``segment``), and the deployed path's cost per gate decision beyond its parts (the
row of kind ``dispatch``, name :data:`DISPATCH_NAME`, with its 95% interval; measured in the same
rounds as the segments, ``harness.phases.dynamic``). A route's latency is the sum over the segments
it runs through, head and gates included, plus one dispatch cost per gate. For DS-MBNet that is head
+ tail + one decision; for DS-ResNet stem + four stages + four decisions, 53 measured parts and one
dispatch cost predicting 256 routes. A dispatch cost whose interval holds zero counts as zero; a
negative one (the parts ran faster chained than timed apart) is added as it is; a refused one
(``measure_failed``: impossible) or none (an older results folder) prices routes by their parts
alone, and ``dispatch_note`` says which.

``LatencyLUT.load(results_dir, backend, model, ...)`` reads it. ``latency(route)`` gives one
route's predicted latency (ms); ``tensor(model)`` gives a ``torch`` tensor in the order of the
model's routing space (``routing_space.all_routes()``, i.e. gate-choice order for a one-gate
model) for the stage-II penalty. A missing or failed segment is a :class:`LUTError` naming what
is missing, never a silent zero.

``reliability(model)`` says how far the prices can be trusted (:class:`LUTReliability`): the
segments whose interval is wider than the protocol allows (``valid`` 0) and the routes priced from
them, how uncertain a route's price is from its parts' intervals (half-widths added: an upper
bound), and, where the same run validated routes, the LUT's error against the deployed engine (a
route whose deployed timing is not valid under the protocol is named with its error, not counted:
a reference too noisy to judge the LUT by).
``harness.retrain_gate`` prints it and keeps it with the comparison; ``harness.report`` tables it.

``matched_distribution(route_madds, target_madds)`` mixes two adjacent routes so the expected
MAdds equal a target (the DS-MBNet-L/M/S rows of Table 7, the acceleration measurement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dsnet import DynamicPlan, Route
from harness.results.layout import Layout, read_csv


class LUTError(ValueError):
    """A LUT that cannot answer: missing file, model, backend, segment or route."""


def route_segment_names(route) -> list[str]:
    """The deployment segments a route runs through, head first (names as in ``dynamic.csv``)."""
    names, prev = ["head"], None
    for k, c in enumerate(route):
        names.append(DynamicPlan.segment_name(k, (prev, c)))
        prev = c
    return names


DISPATCH_NAME = "per_decision"  # the name of the dispatch row in dynamic.csv


@dataclass(frozen=True)
class LUTReliability:
    """How far a LUT's route prices can be trusted (see the module docstring). Fractions, not %."""

    routes: int
    invalid_segments: tuple[str, ...]
    invalid_routes: tuple[str, ...]  # routes priced from at least one invalid segment
    interval_median: float | None  # a route price's interval half-width over the price, median over routes
    interval_max: float | None
    validated: int = 0  # routes the same run timed deployed, with an interval the protocol allows
    error_median: float | None = None  # |LUT - deployed| / deployed over them
    error_max: float | None = None
    unjudged: tuple[tuple[str, float], ...] = ()  # (route, error) where the deployed timing was too wide to judge

    def note(self) -> str:
        """One line for a log or a report."""
        parts = []
        if self.invalid_segments:
            shown = ", ".join(self.invalid_routes[:8]) + (" ..." if len(self.invalid_routes) > 8 else "")
            segs = ", ".join(self.invalid_segments[:6]) + (" ..." if len(self.invalid_segments) > 6 else "")
            parts.append(f"{len(self.invalid_routes)} of {self.routes} routes are priced from the "
                         f"{len(self.invalid_segments)} segment(s) whose interval is wider than the protocol allows "
                         f"({segs}): routes {shown}")
        else:
            parts.append(f"every segment valid ({self.routes} routes)")
        if self.interval_median is not None:
            parts.append(f"a route's price within +-{100 * self.interval_median:.1f}% (median; "
                         f"max +-{100 * self.interval_max:.1f}%) from its parts' intervals")
        if self.validated:
            parts.append(f"against the deployed engine in the same run {100 * self.error_median:.1f}% median "
                         f"|error| (max {100 * self.error_max:.1f}%) over {self.validated} routes")
        if self.unjudged:
            parts.append(unjudged_text(self.unjudged))
        return "; ".join(parts)


def route_errors_text(pairs, limit: int | None = None) -> str:
    """``(route, error)`` pairs as ``5 (-9.5%), 11 (+8.3%)``, the first ``limit`` of them and ``...``."""
    shown = pairs if limit is None else pairs[:limit]
    return ", ".join(f"{r} ({100 * e:+.1f}%)" for r, e in shown) + (" ..." if len(shown) < len(pairs) else "")


def unjudged_text(unjudged) -> str:
    """The routes whose deployed timing cannot judge the LUT, with their errors, as one clause."""
    return (f"{len(unjudged)} route(s) not judged, their deployed timing's interval wider than the protocol "
            f"allows: {route_errors_text(unjudged, 6)}")


def judged_errors(routes: pd.DataFrame) -> tuple[list[tuple[str, float]], tuple[tuple[str, float], ...]]:
    """From ``route`` rows (ok, with ``rel_error``): ``([(route, error)], unjudged)``, row by row.
    A route whose deployed timing was stored as not valid (``valid`` 0: its interval wider than the
    protocol allows) cannot judge the LUT, which it is compared with: its error goes to ``unjudged``
    (named with the figures, not counted in them). Rows without ``valid`` (older exports) all count."""
    errors, unjudged = [], []
    for r in routes.itertuples():
        if not pd.isna(r.rel_error):
            (unjudged if getattr(r, "valid", 1) == 0 else errors).append((str(r.name), float(r.rel_error)))
    return errors, tuple(unjudged)


@dataclass
class LatencyLUT:
    model: str
    backend: str
    precision: str
    batch_size: int
    input_size: int
    segment_ms: dict[str, float]
    failed: dict[str, str]
    dispatch_ms: float = 0.0  # per gate decision, added to every route (0 when its interval holds zero; may be < 0)
    dispatch_note: str = ""  # how dispatch_ms was obtained (one line)
    segment_interval: dict[str, tuple[float, float]] = field(default_factory=dict)  # the p50's 95% interval (ms)
    invalid: tuple[str, ...] = ()  # segments stored as not valid under the protocol
    dispatch_halfwidth_ms: float = 0.0  # of the dispatch cost, when it is counted
    route_errors: dict[str, float] = field(default_factory=dict)  # (LUT - deployed) / deployed, same run
    unjudged: tuple[tuple[str, float], ...] = ()  # routes whose deployed timing is not valid (judged_errors)

    @classmethod
    def load(cls, results_dir, backend: str, model: str, precision: str = "fp32", batch_size: int = 1,
             input_size: int | None = None) -> LatencyLUT:
        path = Layout(Path(results_dir)).dynamic_csv
        if not path.is_file():
            raise LUTError(f"no LUT at {path}: run `python -m harness.run --target <target>` first")
        try:
            df = read_csv(path)
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
            raise LUTError(f"{path} is not a dynamic.csv of harness.run ({type(e).__name__})") from None
        missing = [c for c in ("model", "backend", "precision", "batch_size", "input_size", "kind", "name",
                               "status", "latency_ms_p50") if c not in df.columns]
        if missing:
            raise LUTError(f"{path} is not a dynamic.csv of harness.run: it lacks {', '.join(missing)}")
        return cls.from_frame(df, model, backend, precision, batch_size, input_size, source=str(path))

    @classmethod
    def from_frame(cls, df: pd.DataFrame, model: str, backend: str, precision: str = "fp32",
                   batch_size: int = 1, input_size: int | None = None, source: str = "results") -> LatencyLUT:
        path = source
        seg = df[(df.kind == "segment") & (df.model == model) & (df.backend == backend)
                 & (df.precision == precision) & (df.batch_size == batch_size)]
        if input_size is not None:
            seg = seg[seg.input_size == input_size]
        if seg.empty:
            segs = df[df.kind == "segment"]
            have = sorted({f"{m}/{b} at {int(s)}px" for m, b, s in zip(segs.model, segs.backend, segs.input_size)})
            at = "" if input_size is None else f" at input size {input_size}"
            raise LUTError(f"{path} has no segments for model {model}, backend {backend}, {precision}, "
                           f"batch {batch_size}{at}; it has: {', '.join(have) or 'nothing'}")
        sizes = sorted(set(seg.input_size))
        if len(sizes) > 1:
            raise LUTError(f"{path} holds {model}/{backend} at input sizes {sizes}: name one with input_size")
        ok = seg[seg.status == "ok"]
        bad = seg[seg.status != "ok"]
        d = df[(df.kind == "dispatch") & (df.name == DISPATCH_NAME) & (df.model == model) & (df.backend == backend)
               & (df.precision == precision) & (df.batch_size == batch_size) & (df.input_size == sizes[0])]
        dispatch_ms, note = dispatch_cost(d.iloc[0] if len(d) else None)
        half = float(d.iloc[0].latency_ms_p50_ci_high - d.iloc[0].latency_ms_p50_ci_low) / 2 \
            if dispatch_ms != 0 else 0.0
        # older exports lack the interval and validity columns: nothing is known of them, nothing claimed
        interval = {r.name: (float(r.latency_ms_p50_ci_low), float(r.latency_ms_p50_ci_high))
                    for r in ok.itertuples() if not pd.isna(getattr(r, "latency_ms_p50_ci_low", float("nan")))
                    and not pd.isna(getattr(r, "latency_ms_p50_ci_high", float("nan")))}
        invalid = tuple(sorted(ok.name[ok.valid == 0])) if "valid" in ok.columns else ()
        routes = df[(df.kind == "route") & (df.status == "ok") & (df.model == model) & (df.backend == backend)
                    & (df.precision == precision) & (df.batch_size == batch_size) & (df.input_size == sizes[0])]
        errors, unjudged = judged_errors(routes) if "rel_error" in routes.columns else ([], ())
        return cls(model, backend, precision, batch_size, int(sizes[0]),
                   {r.name: float(r.latency_ms_p50) for r in ok.itertuples()},
                   {r.name: f"{r.status}: {r.error}" for r in bad.itertuples()}, dispatch_ms, note,
                   interval, invalid, half, dict(errors), unjudged)

    def latency(self, route) -> float:
        """Predicted latency (ms) of ``route`` as deployed: its segments plus one dispatch cost per gate."""
        names = route_segment_names(route)
        problems = [f"{n} ({self.failed[n]})" if n in self.failed else n
                    for n in names if n not in self.segment_ms]
        if problems:
            raise LUTError(f"LUT {self.model}/{self.backend} cannot price route {Route(tuple(route))}: "
                           f"missing or failed segment(s) {', '.join(problems)}")
        return sum(self.segment_ms[n] for n in names) + len(tuple(route)) * self.dispatch_ms

    def tensor(self, model) -> torch.Tensor:
        """Latency (ms) of every route of ``model``, in routing-space order."""
        routes = model.routing_space.all_routes()
        missing, values = [], []
        for r in routes:
            try:
                values.append(self.latency(r))
            except LUTError:
                missing.append(str(r))
        if missing:
            raise LUTError(f"LUT {self.model}/{self.backend} lacks {len(missing)} of {len(routes)} routes "
                           f"of the model: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        return torch.tensor(values, dtype=torch.float32)

    def reliability(self, model) -> LUTReliability:
        """How far the prices of ``model``'s routes can be trusted (see the module docstring)."""
        routes = model.routing_space.all_routes()
        invalid_routes, widths, used = [], [], set()
        for r in routes:
            names = route_segment_names(r)
            used.update(names)
            if any(n in self.invalid for n in names):
                invalid_routes.append(str(r))
            if all(n in self.segment_interval for n in names):
                half = sum((self.segment_interval[n][1] - self.segment_interval[n][0]) / 2 for n in names)
                widths.append((half + len(tuple(r)) * self.dispatch_halfwidth_ms) / self.latency(r))
        errors = [abs(e) for e in self.route_errors.values()]
        return LUTReliability(
            len(routes), tuple(n for n in self.invalid if n in used),
            tuple(invalid_routes), float(np.median(widths)) if widths else None,
            float(max(widths)) if widths else None, len(errors),
            float(np.median(errors)) if errors else None, float(max(errors)) if errors else None, self.unjudged)


def holds_zero(low: float, high: float) -> bool:
    """Whether an interval holds zero: a dispatch cost there counts as zero."""
    return low <= 0 <= high


def dispatch_cost(row) -> tuple[float, str]:
    """``(ms per decision the LUT adds, how it was obtained)`` from a stored dispatch row (a mapping
    of its columns, or None)."""
    if row is None:
        return 0.0, "no dispatch cost stored (measured before the LUT priced it): routes priced by their parts alone"
    if row["status"] != "ok":
        return 0.0, f"dispatch cost refused ({row['error']}): routes priced by their parts alone"
    p50, low, high = (float(row[c]) * 1e3 for c in ("latency_ms_p50", "latency_ms_p50_ci_low",
                                                     "latency_ms_p50_ci_high"))
    cost, interval = f"dispatch cost {p50:+.0f} us per decision", f"{low:+.0f}..{high:+.0f} us"
    if holds_zero(low, high):
        return 0.0, f"{cost}, its interval {interval} holds zero: counted as zero"
    # below zero: the parts ran faster inside the deployed path than each timed as a sample of its own
    close = "; the parts ran faster chained in the deployed path than timed apart):" if high < 0 else ")"
    return p50 / 1e3, f"{cost} (interval {interval}{close} added per gate"


def matched_distribution(route_madds: dict, target_madds: float) -> dict:
    """Two adjacent routes mixed so the expected MAdds equal ``target_madds``."""
    ordered = sorted(route_madds, key=route_madds.get)
    lo, hi = route_madds[ordered[0]], route_madds[ordered[-1]]
    if not lo <= target_madds <= hi:
        raise ValueError(f"target {target_madds / 1e6:.1f}M MAdds is outside the routes' "
                         f"{lo / 1e6:.1f}M..{hi / 1e6:.1f}M")
    for a, b in zip(ordered, ordered[1:]):
        ma, mb = route_madds[a], route_madds[b]
        if ma <= target_madds <= mb:
            w = 0.0 if mb == ma else (target_madds - ma) / (mb - ma)
            return {a: 1.0 - w, b: w} if w not in (0.0, 1.0) else {b if w else a: 1.0}
    return {ordered[-1]: 1.0}
