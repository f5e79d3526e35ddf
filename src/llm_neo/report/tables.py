"""Markdown tables, the format every command prints its results in (and their HTML twin for reports)."""

from __future__ import annotations

import math
from typing import Any


def format_table(rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table: one row per named result, one column per metric (missing cells blank). A
    newline in a cell is written ``<br>`` and a ``|`` escaped, so a multi-line text keeps its lines and
    the table its shape."""
    header = "| | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [header, rule]
    for name, values in rows.items():
        cells = [_markdown_cell(_cell(values.get(c))) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def format_gib(value: float | None) -> str:
    """A memory size in GiB as every report prints it: two decimals from 1 GiB, else three significant
    digits (a tiny CPU model's peak is a few MiB); blank when unknown."""
    if value is None:
        return ""
    return f"{value:.2f}" if value >= 0.995 else f"{value:.3g}"


def format_sig(value: float, digits: int = 2) -> str:
    """``value`` rounded to ``digits`` significant figures, in plain notation with thousands separators
    (0.0139 → "0.014", 1234 → "1,200", never "1.2e+03"): a projection is an estimate, and more digits
    would claim a precision it does not have."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = _round_sig(value, digits)
    decimals = max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)  # 9.96 → 10, not 10.0
    return f"{rounded:,.{decimals}f}"


def format_duration(seconds: float) -> str:
    """A duration in the unit that reads best, to two significant figures: seconds under a minute,
    minutes under an hour, else hours ("50 s" and "50 min", never "0.0 hours"; "1,200 h")."""
    if _round_sig(seconds, 2) < 60:
        return f"{format_sig(seconds)} s"
    # Here because it rounds up to the next unit: 59.7 s reads "1.0 min", not "0.99 min".
    if _round_sig(seconds / 60, 2) < 60:
        return f"{format_sig(max(seconds / 60, 1.0))} min"
    return f"{format_sig(max(seconds / 3600, 1.0))} h"


def _round_sig(value: float, digits: int) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_html_table(
    rows: dict[str, dict[str, Any]], columns: list[str], *, css_class: str = "table"
) -> str:
    """``format_table``'s table as HTML (cells formatted the same way, text escaped, a newline a line
    break), in a ``<div class="{css_class}">``."""
    from html import escape

    head = "<tr><th></th>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
    body = [
        f"<tr><th>{escape(name)}</th>"
        + "".join(f"<td>{escape(_cell(values.get(c))).replace(chr(10), '<br>')}</td>" for c in columns)
        + "</tr>"
        for name, values in rows.items()
    ]
    table = f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="{escape(css_class)}">{table}</div>'
