"""Plain tables: aligned, wrapped to the terminal's width, never interpreted."""

from __future__ import annotations

import click

from devicebridge.cli.table import Table
from devicebridge.cli.words import a_kind, kind_words, zone_words


def plain(lines: list[str]) -> list[str]:
    return [click.unstyle(line) for line in lines]


def test_a_wide_table_fits_80_columns_by_wrapping_its_widest_cells() -> None:
    table = Table(("id", "routine", "device", "status", "why"), title="Sessions")
    table.add_row(
        "12",
        "Gentle drainage after mesotherapy or tissue stimulators",
        "[bold]my face massager[/bold]",
        "interrupted",
        "device rebooted while the routine ran, the session ends interrupted",
    )
    lines = plain(table.render(80))
    assert all(len(line) <= 80 for line in lines), lines
    text = " ".join(" ".join(lines).split())
    assert "[bold]my face" in text  # brackets are text
    assert lines[0] == "Sessions"
    assert lines[1].split() == ["id", "routine", "device", "status", "why"]


def test_piped_tables_do_not_wrap() -> None:
    table = Table(("a", "b"))
    table.add_row("x" * 120, "y")
    lines = plain(table.render(None))
    assert len(lines) == 3
    assert lines[2].startswith("x" * 120)


def test_names_people_use() -> None:
    assert zone_words("cheek_left") == "left cheek"
    assert zone_words("eye_area_right") == "right eye area"
    assert zone_words("forehead") == "forehead"
    assert zone_words("masseter_left") == "left masseter (jaw muscle)"
    assert kind_words("led_mask") == "LED mask"
    assert a_kind("led_mask") == "an LED mask"
    assert a_kind("massager") == "a massager"
