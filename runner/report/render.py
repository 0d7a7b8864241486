"""Rendering the run report: one list of blocks (headings, paragraphs, tables, pictures) -> report.md and report.html.

The report's content is decided in runner/report/build.py and runner/report/stage_sections.py; this module only lays it out, the
same way in both formats: every cell is already formatted text (never a Python repr), and the HTML is one
self-contained file (inline CSS, pictures embedded as data URIs, no JavaScript).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cell:
    """A table cell with a look: "ok" (green), "bad" (red, bold in markdown), "muted" (grey), "" (plain)."""

    text: str
    style: str = ""


CellLike = str | Cell


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Para:
    text: str
    style: str = ""  # "muted" | "lead" | ""


@dataclass
class Callout:
    """A box that must not be missed: a failed step's error, a forgetting verdict over budget."""

    title: str
    text: str
    style: str = "bad"  # "bad" | "ok" | "warn"


@dataclass
class Table:
    header: list[str]
    rows: list[list[CellLike]]
    caption: str = ""
    compact: bool = False  # a two-column figure/value table


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    src: Path  # a file in the run folder; markdown links it, HTML embeds it
    alt: str
    caption: str = ""


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Grid:
    """Headline figures side by side (HTML); a list in markdown."""

    tiles: list[tuple[str, str, str, str]] = field(default_factory=list)  # (label, value, note, style: ok | bad | "")


Block = Heading | Para | Callout | Table | Bullets | Image | Code | Grid


# --- markdown -----------------------------------------------------------------------------------------------------------


def _md_cell(cell: CellLike) -> str:
    text = cell.text if isinstance(cell, Cell) else cell
    text = text.replace("|", "\\|").replace("\n", "<br>")
    return f"**{text}**" if isinstance(cell, Cell) and cell.style == "bad" and text else text


def markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [f"_{block.text}_" if block.style == "muted" else block.text, ""]
        elif isinstance(block, Callout):
            body = block.text.splitlines() or [""]
            lines += [f"> **{block.title}**", ">"] + [f"> {line}" if line else ">" for line in body] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"**{block.caption}**", ""]
            lines += ["| " + " | ".join(_md_cell(h) for h in block.header) + " |",
                      "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows] + [""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Image):
            lines += [f"![{block.alt}]({block.src.name})", ""] + ([f"_{block.caption}_", ""] if block.caption else [])
        elif isinstance(block, Code):
            lines += [f"```{block.lang}", block.text.rstrip(), "```", ""]
        elif isinstance(block, Grid):
            lines += [f"- **{label}:** {value}" + (f" ({note})" if note else "") for label, value, note, _ in block.tiles]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- HTML ---------------------------------------------------------------------------------------------------------------

_STYLE = """
:root{--ink:#1d2330;--muted:#5f6b7a;--line:#dfe3ea;--head:#f3f5f9;--ok:#137333;--bad:#b3261e;--warn:#8a5a00}
body{font:15px/1.55 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1080px;margin:2em auto;padding:0 1.2em;
color:var(--ink)}
h1{margin:0 0 .2em;font-size:1.9em} h2{margin:1.8em 0 .5em;padding-bottom:.2em;border-bottom:2px solid var(--line)}
h3{margin:1.3em 0 .4em}
.muted{color:var(--muted)} .ok{color:var(--ok)} .bad{color:var(--bad);font-weight:600} .warn{color:var(--warn)}
.lead{font-size:1.05em}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:14px;max-width:100%}
td,th{border:1px solid var(--line);padding:5px 10px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600} tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv td:first-child{color:var(--muted);white-space:nowrap} caption{text-align:left;font-weight:600;padding:.3em 0}
.callout{border-left:5px solid var(--bad);background:#fdf1f0;padding:.7em 1em;margin:1em 0;border-radius:4px}
.callout.ok{border-color:var(--ok);background:#eef7f0} .callout.warn{border-color:#d39e00;background:#fff8e5}
.callout b{display:block;margin-bottom:.3em;color:var(--bad)} .callout.ok b{color:var(--ok)} .callout.warn b{color:var(--warn)}
.callout pre{background:none;padding:0;margin:0;white-space:pre-wrap;font:14px/1.5 system-ui,sans-serif;color:var(--ink)}
.grid{display:flex;flex-wrap:wrap;gap:10px;margin:.8em 0 1.2em}
.tile{flex:1 1 150px;border:1px solid var(--line);border-radius:6px;padding:.6em .8em;background:#fbfcfe}
.tile .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.tile .value{font-size:1.45em;font-weight:650;font-variant-numeric:tabular-nums}
.tile .note{font-size:12.5px;color:var(--muted)}
.tile-ok{border-color:#9fd3ad;background:#f1f9f3} .tile-ok .value{color:var(--ok)}
.tile-bad{border-color:#eba8a2;background:#fdf1f0} .tile-bad .value{color:var(--bad)}
figure{margin:.5em 0 1.5em} figure img{max-width:100%;border:1px solid var(--line);border-radius:4px}
figcaption{font-size:13px;color:var(--muted)}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
pre{background:#f6f8fa;padding:1em;overflow:auto;border-radius:4px}
ul{padding-left:1.3em}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_UNITS = ("ms", "s", "MB", "GB", "KB", "B", "%", "points")


def _looks_numeric(text: str) -> bool:
    """A lone figure (with at most a unit) lines up right in a column; a sentence with figures in it does not."""
    words = text.replace(",", "").replace("−", "-").replace("%", " %").split()
    if not words or len(words) > 2 or (len(words) == 2 and words[1] not in _UNITS):
        return False
    try:
        float(words[0].removeprefix("+").removeprefix("±"))
    except ValueError:
        return False
    return True


def _html_cell(cell: CellLike, tag: str = "td", align: bool = True) -> str:
    text, style = (cell.text, cell.style) if isinstance(cell, Cell) else (cell, "")
    classes = " ".join(filter(None, [style, "num" if tag == "td" and align and _looks_numeric(text) else ""]))
    body = html.escape(text).replace("\n", "<br>")
    return f"<{tag}{f' class={chr(34)}{classes}{chr(34)}' if classes else ''}>{body}</{tag}>"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f" id='{html.escape(block.anchor)}'" if block.anchor else ""
        return f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f"<p class='{block.style}'>{html.escape(block.text)}</p>" if block.style else f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Callout):
        return (f"<div class='callout {block.style}'><b>{html.escape(block.title)}</b>"
                f"<pre>{html.escape(block.text)}</pre></div>")
    if isinstance(block, Table):
        # a figure/value table reads as a list: no header row, no right-aligned numbers
        head = "".join(_html_cell(h, "th") for h in block.header) if any(block.header) and not block.compact else ""
        body = "".join("<tr>" + "".join(_html_cell(c, align=not block.compact) for c in row) + "</tr>"
                       for row in block.rows)
        caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        return f"<table{' class=kv' if block.compact else ''}>{caption}{f'<tr>{head}</tr>' if head else ''}{body}</table>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Image):
        caption = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
        return f"<figure><img src='{_data_uri(block.src)}' alt='{html.escape(block.alt)}'>{caption}</figure>"
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    tiles = "".join(
        f"<div class='tile{f' tile-{style}' if style else ''}'><div class='label'>{html.escape(label)}</div>"
        f"<div class='value'>{html.escape(value)}</div><div class='note'>{html.escape(note)}</div></div>"
        for label, value, note, style in block.tiles
    )
    return f"<div class='grid'>{tiles}</div>"


def page(title: str, verdict: tuple[str, str], blocks: list[Block]) -> str:
    """verdict: (text, style) shown after the title, e.g. ("succeeded", "ok")."""
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}: <span class='{verdict[1]}'>{html.escape(verdict[0])}</span></h1>",
        *(_html_block(block) for block in blocks),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
