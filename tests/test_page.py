"""``results/<target>/index.html``: every table and figure of a folder on one self-contained page."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from test_report import STORED, STORED_FILES  # the committed x86 run's stored results

from harness import report
from harness.reporting.common import marked_invalid


class Page(HTMLParser):
    """What the tests read of a page: element ids, images, links, invalid cells, headings, text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.links, self.tags = set(), {}, [], []
        self.invalid, self.headings, self.text, self._heading = 0, [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images[a.get("alt")] = a.get("src", "")
        if tag == "a" or "src" in a or "href" in a:
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "td" and a.get("class") == "invalid":
            self.invalid += 1
        if tag in ("h1", "h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)


def _built(folder: Path) -> Page:
    assert report.main(["--target", "x86", "--results", str(folder)]) == 0
    return Page((folder / "index.html").read_text(encoding="utf-8"))


def test_the_page_holds_every_table_and_figure_of_the_folder(tmp_path):
    for name in STORED_FILES:
        shutil.copy(STORED / name, tmp_path / name)
    page = _built(tmp_path)
    text = " ".join(page.text)
    tables = sorted((tmp_path / "tables").glob("*.md"))
    assert len(tables) == 5
    marked = 0
    for md in tables:
        assert f"table-{md.stem}" in page.ids, md.name
        title = md.read_text().splitlines()[0].lstrip("# ")
        assert title in page.headings, title
        assert f"python -m harness.report --target x86 --results {tmp_path} --input-size 224" in text
        marked += sum(marked_invalid(c.strip()) and c.strip()[:1].isdigit()
                      for line in md.read_text().splitlines() if line.startswith("|") for c in line.split("|"))
    assert page.invalid == marked > 0  # the committed run has cells flagged invalid: each one highlighted
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert len(figures) == 7
    for png in figures:
        src = page.images[png.name]
        assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
    assert "gate-retraining" in page.ids and "environment" in page.ids
    assert "Drift" in text and "interquartile range" in text
    # self-contained: nothing fetched from anywhere, nothing run
    assert all(link.startswith(("#", "data:image/png;base64,")) for link in page.links), page.links
    assert "script" not in page.tags


def test_a_folder_missing_a_phase_and_holding_failed_rows_still_renders_and_says_so(tmp_path):
    lut = pd.read_csv(STORED / "lut.csv", dtype={"route": str, "error": str})
    lut = lut[lut.model == "mobilenet_v1"].copy()
    lut.loc[lut.index[0], ["status", "error"]] = ["compile_failed", "a compiler error"]
    lut.to_csv(tmp_path / "lut.csv", index=False)
    env = json.loads((STORED / "env.json").read_text())
    env["device_name"] = "<script>alert(1)</script>"
    env["skipped"] = {"inductor": "torch._inductor needs a C++ compiler"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    page = _built(tmp_path)
    text = " ".join(page.text)
    assert "What this folder lacks" in page.headings
    assert "not built: table7" in text and "not built: table2" in text  # no dynamic.csv: those tables are missing
    assert "lut.csv:" in text and "1 compile_failed" in text
    assert "not measured: inductor (torch._inductor needs a C++ compiler)" in text
    assert "table-slimmable_table3" in page.ids  # what could be built is there
    assert "script" not in page.tags and "<script>alert(1)</script>" in text  # shown as text, never run


@pytest.mark.browser
def test_the_page_renders_in_headless_chromium(tmp_path):
    """Opt-in (``-m browser``, Debian's ``chromium``): the committed folder's page drawn by a real
    browser is not blank and its first table (the drift table, header cells #dde3f0) is on screen."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    for name in STORED_FILES:
        shutil.copy(STORED / name, tmp_path / name)
    _built(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,1000", (tmp_path / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round()
    assert pixels.std() > 10, "the screenshot is blank"
    header = ((abs(pixels - [0xDD, 0xE3, 0xF0]) <= 2).all(axis=-1))
    assert header.sum() > 500, "no table header on the first screen"
