"""The documentation stays true: the CLI reference is regenerated from the click commands."""

from pathlib import Path

from sdk.clidoc import render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_current() -> None:
    committed = (DOCS / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run python -m sdk.clidoc > docs/cli.md"


def test_every_command_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    for cmd in ("edgesdk convert", "edgesdk agent run", "edgesdk fleet deploy", "edgesdk fleet run", "edgesdk demo"):
        assert f"`{cmd}`" in text
