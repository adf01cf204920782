"""``python -m dsnet.summary``: every route in three formats; bad input exits 2 with one line."""

import csv
import io
import json
import subprocess
import sys

import dsnet
from dsnet.summary import main


def test_csv_lists_every_route_with_profile_figures(capsys):
    assert main(["--model", "ds_mbnet", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    model = dsnet.create_model("ds_mbnet")
    assert [r["route"] for r in rows] == [str(r) for r in model.routes()]
    assert rows[0]["widths"] == "224/736" and rows[-1]["widths"] == "640/1152"
    assert int(rows[3]["madds"]) == dsnet.profile(model, model.routes()[3]).madds


def test_json_and_table_at_another_resolution(capsys):
    assert main(["--model", "ds_resnet50_tiny", "--input-size", "64", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 256
    model = dsnet.create_model("ds_resnet50_tiny")
    assert rows[-1]["madds"] == dsnet.profile(model, (3, 3, 3, 3), 64).madds
    assert main(["--model", "mobilenet_v1"]) == 0
    assert "mobilenet_v1 at 224x224: 1 route(s)" in capsys.readouterr().out


def test_unknown_model_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "dsnet.summary", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown model 'nope'; valid models: " + ", ".join(dsnet.list_models())]
