"""benchmarks/cut_in_context.py: the deployed path and the static engine of one route, timed after 0
or N other routes' static engines; bad input is one line and exit 2."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("cut_in_context", ROOT / "benchmarks" / "cut_in_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_times_one_route_in_both_contexts(tmp_path, capsys):
    bench = _benchmark()
    rc = bench.main(["--model", "ds_mbnet_tiny", "--backend", "eager", "--input-size", "64", "--rounds", "3",
                     "--decoys", "1,0", "--cache", str(tmp_path), "--load-all-segments"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert [line.split(",")[1].strip() for line in out] == ["0 decoys", "1 decoys"]  # sorted, one line each
    for line in out:
        assert line.startswith("ds_mbnet_tiny eager route ") and "deployed - static" in line
        assert "chain - static" in line and "parts head" in line


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "mobilenet_v1"], "has no gates"),
    (["--model", "ds_mbnet_tiny", "--route", "99"], "--route:"),
    (["--model", "ds_mbnet_tiny", "--decoys", "x"], "error:"),
    (["--model", "ds_mbnet_tiny", "--rounds", "1"], "--rounds must be at least 3"),
    (["--model", "ds_mbnet_tiny", "--decoys", "0,99"], "fewer than 99 decoys"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    rc = _benchmark().main(args + ["--input-size", "64", "--backend", "eager"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
