"""``python -m harness.compare DIR_A DIR_B``: two results folders compared cell by cell.

Prints per cell the ratio B / A of the medians with its 95% interval and ``same`` where the
difference is not significant (the interval holds 1), then per backend the median and max
difference of absolute and of relative latency and the rank agreement of routes
(``harness.reporting.compare``). ``--csv PATH`` writes the cells. Exit codes: 0 done; 2 a folder
without ``lut.csv`` or nothing in common (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import UsageError, run_main
from harness.reporting.common import ReportError
from harness.reporting.compare import CompareError, compare, per_backend
from harness.reporting.tables import read_lut
from harness.results.layout import Layout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="results folder A (e.g. results/x86)")
    p.add_argument("b", type=Path, help="results folder B")
    p.add_argument("--csv", type=Path, help="write the per-cell comparison here")
    args = p.parse_args(argv)
    return run_main(lambda: _main(args), "nothing was written")


def _main(args) -> int:
    try:
        cells = compare(read_lut(Layout(args.a)), read_lut(Layout(args.b)))
    except (ReportError, CompareError) as e:
        raise UsageError(str(e)) from None
    show = cells[["model", "route", "backend", "precision", "batch_size", "input_size", "latency_ms_p50_a",
                  "latency_ms_p50_b", "ratio", "ratio_low", "ratio_high", "same"]]
    print(show.to_markdown(index=False, floatfmt=".3f"))
    print()
    print(per_backend(cells).to_markdown(index=False, floatfmt=".2f"))
    if args.csv:
        cells.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
