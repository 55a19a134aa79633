"""Reading the report's JavaScript and CSS assets (package data under report/assets)."""

from __future__ import annotations

from importlib import resources


def asset(name: str) -> str:
    """The text of report/assets/`name`."""
    return resources.files("mechscope.report").joinpath("assets", name).read_text(encoding="utf-8")
