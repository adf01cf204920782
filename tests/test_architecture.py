"""The architecture holds: no import cycles, dsnet never imports harness, no CLI imported by a module."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "import_layers.py"


def test_import_layers_strict_is_clean():
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} is not beside this checkout")
    proc = subprocess.run([sys.executable, str(TOOL), "--strict"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no cycles" in proc.stdout


def test_every_module_states_its_contract():
    """A docstring at the top of every module of both packages."""
    import ast

    missing = [str(p.relative_to(ROOT)) for pkg in ("dsnet", "harness") for p in sorted((ROOT / pkg).rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
