"""One self-contained results page per folder: ``results/<target>/index.html``.

Contract
--------
``write_page(layout, sections, env, skipped, rebuild)`` writes ``layout.page``: every table the
report wrote (``sections``: ``(name, markdown)`` as written under ``tables/``), the gate-retraining
report when the folder has one, every figure under ``figures/`` embedded as a data URI (the page
needs nothing beside it and no network), the environment with each round phase's drift, and what is
missing: tables that could not be built and why, backends not measured, stored rows that failed, by
status. Each table says the command that rebuilds it (``rebuild``). Cells marked invalid
(:func:`harness.reporting.common.marked_invalid`) are highlighted.

The page is rendered from the same Markdown files the report writes (a small renderer for the
subset they use: headings, paragraphs, pipe tables, ``**bold**`` and ``code``), so the page and the
files cannot say different things. Every text is HTML-escaped; the page has no script.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd

from harness.reporting.common import marked_invalid
from harness.results.layout import Layout
from harness.results.store import write_atomically

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 80em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #446; } h2 { margin-top: 2em; border-bottom: 1px solid #aab; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th { background: #dde3f0; } th, td { border: 1px solid #99a; padding: 0.2em 0.5em; text-align: left; }
td.invalid { background: #fde2c8; } .missing { background: #fff4d6; padding: 0.5em 1em; border: 1px solid #e0c070; }
code { background: #eef; padding: 0 0.2em; } figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ccd; }
nav a { margin-right: 1em; }
"""

_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>")]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str], mark_invalid: bool) -> str:
    head, rows = _cells(lines[0]), [_cells(x) for x in lines[2:]]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    for row in rows:
        tds = []
        for c in row:
            marked = mark_invalid and c[:1].isdigit() and marked_invalid(c)
            tds.append(f'<td class="invalid">{_inline(c)}</td>' if marked else f"<td>{_inline(c)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "\n".join(out + ["</table>"])


def markdown_html(md: str, mark_invalid: bool = True, shift: int = 1) -> str:
    """The Markdown subset the report writes as HTML; headings moved down ``shift`` levels; latency
    cells marked invalid highlighted (``mark_invalid``)."""
    out, para, lines = [], [], md.splitlines()
    i = 0

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            flush()
            level = min(6, len(line) - len(line.lstrip("#")) + shift)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j], mark_invalid))
            i = j
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (f'<figure id="figure-{html.escape(path.stem)}"><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>figures/{name}</figcaption></figure>")


def _drift(env: dict) -> str:
    drift = {p: d for p, d in (env.get("drift") or {}).items() if isinstance(d, dict) and d.get("rounds")}
    if not drift:
        return "<p>No round phase recorded its drift.</p>"
    df = pd.DataFrame([{"round phase": p, "rounds": d.get("rounds"), "speed factor min": d.get("factor_min"),
                        "max": d.get("factor_max"), "interquartile range": d.get("factor_iqr")}
                       for p, d in drift.items()])
    return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)


def _failed(frames: dict[str, pd.DataFrame]) -> list[str]:
    """One line per file with stored rows that are not ``ok``: how many, by status."""
    out = []
    for name, df in frames.items():
        if len(df) and "status" in df.columns:
            bad = df[df.status != "ok"].status.value_counts()
            if len(bad):
                out.append(f"{name}: {len(df) - int(bad.sum())} rows ok, "
                           + ", ".join(f"{n} {s}" for s, n in bad.items()) + " (their error column says why)")
    return out


def write_page(layout: Layout, sections: list[tuple[str, str]], env: dict, skipped: list[str], rebuild: str,
               frames: dict[str, pd.DataFrame] | None = None, env_text: str = "") -> Path:
    """Write ``layout.page`` (see the module docstring); returns its path."""
    title = f"dsnet-harness results: {env.get('target') or layout.root.name}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    nav = [("environment", "Environment")] + [(f"table-{n}", n) for n, _ in sections]
    gate_md = layout.gate_report.read_text() if layout.gate_report.is_file() else ""
    if gate_md:
        nav.append(("gate-retraining", "gate retraining"))
    figures = sorted(layout.figures_dir.glob("*.png")) if layout.figures_dir.is_dir() else []
    if figures:
        nav.append(("figures", "figures"))
    body.append("<nav>" + "".join(f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in nav) + "</nav>")
    missing = [f"not built: {s}" for s in skipped] + _failed(frames or {})
    missing += [f"not measured: {b} ({why})" for b, why in sorted((env.get("skipped") or {}).items())]
    if missing:
        body.append('<div class="missing"><h2>What this folder lacks</h2><ul>'
                    + "".join(f"<li>{_inline(m)}</li>" for m in missing) + "</ul></div>")
    body.append('<h2 id="environment">Environment</h2>')
    body.append(f"<p>{_inline(env_text)}</p>" if env_text else "<p>No env.json in this folder.</p>")
    body.append(_drift(env))
    for name, md in sections:
        body.append(f'<section id="table-{html.escape(name)}">{markdown_html(md)}'
                    f"<p>Rebuild: <code>{html.escape(rebuild)}</code> (tables/{html.escape(name)}.md and .csv)</p>"
                    "</section>")
    if gate_md:
        body.append(f'<section id="gate-retraining">{markdown_html(gate_md)}</section>')
    if figures:
        body.append('<h2 id="figures">Figures</h2>' + "".join(_figure(p) for p in figures))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
           + "\n".join(body) + "\n</body></html>\n")
    write_atomically(layout.page, lambda tmp: Path(tmp).write_text(doc, encoding="utf-8"))
    return layout.page
