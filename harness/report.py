"""``python -m harness.report --target T``: the papers' tables and the comparison plots, rebuilt from
stored results alone (never measuring); see ``harness.reporting.tables`` for what is built.

Reads ``results/<T>`` (or ``--results DIR``) and writes ``tables/`` and ``figures/`` there. Exit
codes: 0 done; 2 nothing to build (missing or empty folder, results of other models, unknown
target), one line.
"""

from __future__ import annotations

import argparse
import sys

from harness.cli import UsageError, add_results_option, results_layout, run_main
from harness.reporting.tables import ReportError, build
from harness.targets import TargetError, load_target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="target profile whose results to report")
    add_results_option(p)
    p.add_argument("--input-size", type=int, help="input resolution of the rows to report (default: the profile's)")
    args = p.parse_args(argv)
    return run_main(lambda: _main(args), "nothing was written")


def _main(args) -> int:
    input_size = args.input_size
    if input_size is None:
        try:
            input_size = load_target(args.target).input_size
        except TargetError as e:
            raise UsageError(str(e)) from None
    layout = results_layout(args.results, args.target)
    try:
        written, skipped = build(layout, input_size, args.target)
    except ReportError as e:
        raise UsageError(str(e)) from None
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    print(f"wrote {len(written)} files under {layout.root}: "
          + ", ".join(str(p.relative_to(layout.root)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
