"""``python -m dsnet.summary --model NAME``: every route of a model with its widths, MAdds, params.

Output formats: ``table`` (aligned text), ``csv``, ``json``. Bad input (unknown model, bad size)
exits 2 with one line on stderr naming the valid choices.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from dsnet.profile import profile
from dsnet.registry import create_model, list_models


def route_rows(model, input_size: int) -> list[dict]:
    """One row per route: its label, widths, stage depths and kernel size (compound routing
    spaces), MAdds, params."""
    rows = []
    for route in model.routes(input_size):
        p = profile(model, route, input_size)
        options = model.routing_space.options(route)
        depths = [d for o in options for d in o.get("depths", ())]
        kernels = [o["kernel"] for o in options if "kernel" in o]
        rows.append({"route": str(route), "widths": "/".join(map(str, model.route_widths(route))),
                     **({"depths": "/".join(map(str, depths))} if depths else {}),
                     **({"kernel": "/".join(map(str, kernels))} if kernels else {}),
                     "madds": p.madds, "params": p.params})
    return rows


def _table(rows: list[dict]) -> str:
    extra = [k for k in ("depths", "kernel") if k in rows[0]]
    headers = ["route", "widths", *extra, "MAdds (M)", "params (M)"]
    body = [[r["route"] or "-", r["widths"], *(r[k] for k in extra), f"{r['madds'] / 1e6:.1f}",
             f"{r['params'] / 1e6:.2f}"] for r in rows]
    cols = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, cols)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in cols])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsnet.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--input-size", type=int, default=224, help="square input resolution")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)
    if args.input_size < 8:
        print(f"error: --input-size must be at least 8, got {args.input_size}", file=sys.stderr)
        return 2
    try:
        model = create_model(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rows = route_rows(model, args.input_size)
    except ValueError as e:  # e.g. an input too small for the network's strides
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        _print(rows, args)
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
    return 0


def _print(rows: list[dict], args) -> None:
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"{args.model} at {args.input_size}x{args.input_size}: {len(rows)} route(s)")
        print(_table(rows))


if __name__ == "__main__":
    sys.exit(main())
