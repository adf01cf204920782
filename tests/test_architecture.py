"""The architecture holds (docs/architecture.md): the import contracts of pyproject.toml (import-linter),
no import cycles, dsnet never imports harness, no CLI imported by a module, a contract docstring on
every module."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "import_layers.py"


def test_the_import_contracts_are_kept():
    """pyproject.toml's [tool.importlinter] contracts: dsnet never imports harness; the harness's
    layers only import downwards, and the commands never import one another."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


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


def test_the_results_format_page_is_the_layout_s():
    """docs/results-format.md is rendered from harness.results.layout (every column documented), so the
    page cannot drift from the files a run writes."""
    from harness.results.layout import (
        COLUMN_DOCS,
        DYNAMIC_COLUMNS,
        DYNAMIC_KINDS,
        GATE_ROUTE_COLUMNS,
        GATE_SUMMARY_COLUMNS,
        KIND_DOCS,
        LUT_COLUMNS,
        describe,
    )

    assert set(LUT_COLUMNS + DYNAMIC_COLUMNS + GATE_SUMMARY_COLUMNS + GATE_ROUTE_COLUMNS) <= set(COLUMN_DOCS)
    assert set(DYNAMIC_KINDS) == set(KIND_DOCS)
    assert (ROOT / "docs" / "results-format.md").read_text() == describe(), \
        "regenerate: python -c \"from harness.results.layout import describe; print(describe(), end='')\" " \
        "> docs/results-format.md"
