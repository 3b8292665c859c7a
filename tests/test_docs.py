"""The documentation stays true: the CLI reference is regenerated from the click commands."""

from pathlib import Path

from edgesdk.clidoc import render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_current() -> None:
    committed = (DOCS / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run python -m edgesdk.clidoc > docs/cli.md"


def test_every_command_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    for cmd in ("edgesdk convert", "edgesdk agent run", "edgesdk fleet deploy", "edgesdk fleet run", "edgesdk demo"):
        assert f"`{cmd}`" in text


def test_the_local_api_specification_matches_the_code() -> None:
    """docs/local-api.md's op and dtype tables and its example requests are what the agent speaks."""
    import re

    import numpy as np

    from agent.localapi import DTYPES, Op, request_head, tensor_headers

    text = (DOCS / "local-api.md").read_text()
    ops = {name: int(code) for code, name in re.findall(r"^\| (\d) +\| ([A-Z]+) +\|", text, flags=re.M)}
    assert ops == {name: value for name, value in vars(Op).items() if name.isupper()}
    dtypes = [name for _, name in re.findall(r"^\| (\d) +\| ([a-z0-9]+) +\| \d +\|", text, flags=re.M)]
    assert dtypes == [d.name for d in DTYPES]

    def request_after(title: str) -> bytes:
        """The hex of the example request below ``title``, without the placeholders of tensor bytes."""
        block = re.search(r"^request +(.+?)^response", text[text.index(title):], flags=re.M | re.S).group(1)
        return bytes.fromhex(re.sub(r"<[^>]*>|[|\s]", "", block))

    assert request_after("`PING` and its answer") == request_head(Op.PING, b"")
    assert request_after("`PREDICT` of model") == request_head(
        Op.PREDICT, b"digits", tensor_headers([np.zeros((1, 8, 8, 1), np.float32)]), 1)
