"""Generate ``docs/cli.md``, the CLI reference, from the click commands themselves.

    python -m edgesdk.clidoc > docs/cli.md

A test regenerates it and fails when the committed file is stale.
"""

from __future__ import annotations

import sys

import click

__all__ = ["render"]


def _walk(cmd: click.Command, path: list[str], parent: "click.Context | None"):
    ctx = click.Context(cmd, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100,
                        help_option_names=["-h", "--help"])
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            yield from _walk(cmd.get_command(ctx, name), path + [name], ctx)


def render() -> str:
    from .cli import cli

    out = ["# edgesdk CLI reference", "",
           "Generated from the click commands by `python -m edgesdk.clidoc > docs/cli.md`; a test fails when it is stale.", ""]
    for path, cmd, ctx in _walk(cli, ["edgesdk"], None):
        out += [f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`", "", "```", cmd.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
