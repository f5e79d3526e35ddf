"""The table helpers every report prints with."""

from __future__ import annotations

import pytest

from llm_neo.report.tables import format_gib, format_table


@pytest.mark.parametrize(
    ("gib", "text"),
    [(None, ""), (0.00512, "0.00512"), (0.5, "0.5"), (0.996, "1.00"), (1.0, "1.00"), (12.345, "12.35")],
)
def test_format_gib_gives_two_decimals_from_one_gib_and_three_digits_below(gib, text):
    assert format_gib(gib) == text


def test_format_table_leaves_a_missing_cell_blank_and_groups_thousands():
    table = format_table({"neo": {"tokens": 12345, "kl": 0.123456}, "kd": {"tokens": 7}}, ["tokens", "kl"])
    assert table.splitlines() == [
        "| | tokens | kl |",
        "|---|---|---|",
        "| neo | 12,345 | 0.1235 |",
        "| kd | 7 |  |",
    ]
