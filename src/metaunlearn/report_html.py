"""Renderers of the report's blocks: Markdown that links the PNG files by
relative path, and one self-contained HTML file (PNGs as base64 data URIs,
inline CSS, no external URL) that opens from disk anywhere."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; } th { background: #f3f3f3; }
img { max-width: 100%; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
details > summary { cursor: pointer; } details > summary h2 { display: inline-block; border: 0; margin: 1em 0 .3em; }
details { border-bottom: 1px solid #ddd; }
"""


def _md_cell(cell) -> str:
    if cell is None:
        return "–"
    if hasattr(cell, "path"):
        return f"![{cell.alt}]({cell.path})"
    return str(cell).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: list[tuple]) -> str:
    out = []
    for kind, *args in doc:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "table":
            headers, rows = args
            out.append("\n".join(["| " + " | ".join(map(_md_cell, headers)) + " |",
                                  "|" + "---|" * len(headers)] +
                                 ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]))
        elif kind == "img":
            out.append(_md_cell(args[0]))
        elif kind == "pre":
            out.append("```yaml\n" + args[0].rstrip() + "\n```")
        elif kind == "details":
            out.append("## " + args[0])
    return "\n\n".join(out) + "\n"


def _img(cell, run_dir: Path) -> str:
    if cell is None:
        return "<span>(missing)</span>"
    data = base64.b64encode((run_dir / cell.path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(cell.alt)}">'


def _cell(cell, run_dir: Path) -> str:
    return _img(cell, run_dir) if cell is None or hasattr(cell, "path") else html.escape(str(cell))


def to_html(doc: list[tuple], run_dir: Path, title: str) -> str:
    body = []
    for kind, *args in doc:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "table":
            headers, rows = args
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
            lines = "".join("<tr>" + "".join(f"<td>{_cell(c, run_dir)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>")
        elif kind == "img":
            body.append(f"<p>{_img(args[0], run_dir)}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(args[0])}</pre>")
        elif kind == "details":
            body.append(f"<details{' open' if args[1] else ''}><summary><h2>{html.escape(args[0])}</h2></summary>")
        elif kind == "end":
            body.append("</details>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
