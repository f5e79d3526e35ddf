"""A report written once as blocks, rendered to Markdown or to one self-contained HTML file.

Blocks are plain data: ``Heading``, ``Paragraph`` (inline ``code`` and **bold**), ``Bullets``,
``Table`` (rows as ``format_table`` takes them) and ``Image`` (a PNG by name). Markdown links an image
to a file beside the report; HTML inlines it as a base64 data URI, so the page needs no network and no
other file. The page is responsive (viewport meta, images scale, long text and table cells wrap, a table
still too wide scrolls in its own box), so it reads on a laptop and a phone without sideways scrolling.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from html import escape
from typing import Any

from llm_neo.report.tables import format_html_table, format_table


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    rows: dict[str, dict[str, Any]]
    columns: list[str]
    wrap: bool = False  # HTML: let long cells wrap (text); by default a cell stays on one line (numbers)


@dataclass(frozen=True)
class Image:
    name: str  # key into the images given to the renderer
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image

# The page never scrolls sideways, at 1280 px or on a 390 px phone: text breaks a long word or path
# (overflow-wrap), images scale, a text table wraps its cells within the page width, and a table still
# too wide (a phone) scrolls inside its own box. Paragraphs keep a readable measure; tables may use the
# full width. Checked in Chromium at both widths by tests/report/test_compare_page.py.
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.45; color: #1b1b1b;
       max-width: 80rem; margin: 0 auto; padding: 1rem; overflow-wrap: break-word; }
p, ul { max-width: 62rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.25rem; margin-top: 2rem; } h3 { font-size: 1.05rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
.table { max-width: 100%; overflow-x: auto; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.88rem; }
.table td { white-space: nowrap; }
.table.wrap table { width: 100%; }
.table.wrap td { white-space: normal; min-width: 7rem; overflow-wrap: anywhere; }
th, td { padding: 0.3rem 0.55rem; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #999; }
code { background: #f2f2f2; padding: 0 0.2rem; border-radius: 3px; }
@media (max-width: 40rem) { body { padding: 0.6rem; } table { font-size: 0.8rem; } }
"""


def to_markdown(blocks: list[Block], image_paths: dict[str, str]) -> str:
    """Markdown; ``image_paths`` maps an Image's name to its path relative to the report."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(format_table(block.rows, block.columns))
        elif block.name in image_paths:
            parts.append(f"![{block.alt}]({image_paths[block.name]})")
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[Block], *, title: str, images: dict[str, bytes]) -> str:
    """One self-contained HTML page; ``images`` maps an Image's name to its PNG bytes (inlined)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            parts.append(
                format_html_table(
                    block.rows, block.columns, css_class="table wrap" if block.wrap else "table"
                )
            )
        elif block.name in images:
            data = base64.b64encode(images[block.name]).decode("ascii")
            parts.append(f'<img alt="{escape(block.alt)}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )


def _inline(text: str) -> str:
    """Escape, then render `code`, **bold** and [text](url) as Markdown would."""
    out = escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)
