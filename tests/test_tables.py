"""The one markdown table writer (memlm.tables)."""

import pytest

from memlm.tables import markdown_table


def test_header_rule_and_rows():
    assert markdown_table(["a", "b"], [["1", "x|y"]]) == ["| a | b |", "|---|---|", "| 1 | x/y |"]
    assert markdown_table(["a"], [], right=True) == ["| a |", "|---:|"]
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        markdown_table(["a"], [["1", "2"]])
