"""Markdown tables, the format every command prints its results in (and their HTML twin for reports)."""

from __future__ import annotations

from typing import Any


def format_table(rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table: one row per named result, one column per metric (missing cells blank)."""
    header = "| | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [header, rule]
    for name, values in rows.items():
        cells = [_cell(values.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_gib(value: float | None) -> str:
    """A memory size in GiB as every report prints it: two decimals from 1 GiB, else three significant
    digits (a tiny CPU model's peak is a few MiB); blank when unknown."""
    if value is None:
        return ""
    return f"{value:.2f}" if value >= 0.995 else f"{value:.3g}"


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
    """``format_table``'s table as HTML (cells formatted the same way, text escaped), in a
    ``<div class="{css_class}">``."""
    from html import escape

    head = "<tr><th></th>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
    body = [
        f"<tr><th>{escape(name)}</th>"
        + "".join(f"<td>{escape(_cell(values.get(c)))}</td>" for c in columns)
        + "</tr>"
        for name, values in rows.items()
    ]
    table = f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="{escape(css_class)}">{table}</div>'
