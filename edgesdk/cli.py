"""The ``edgesdk`` command: a thin layer over the Python API of every role.

Every command has ``--help``; the ones whose output scripts read take ``--json``. Errors from
edgesdk print one line (``error: ...``) and exit with the error kind's code (see
:mod:`sdk.errors`); ``--debug`` (or ``EDGESDK_DEBUG=1``) shows the traceback instead.

The shared commands (``keys``, ``bundle``, ``runtime``) come from :mod:`sdk.cli`. Each role's
commands are attached lazily (:class:`LazyGroup`): ``edgesdk agent ...`` imports ``agent.cli``
and nothing of the fleet or the converter, and ``edgesdk --help`` lists every command from
:data:`COMMANDS` without importing any of them (a test checks the table says what the commands
say). A role whose extra is not installed gives one line naming the ``pip install``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, NamedTuple, Optional

import click

from sdk import __version__
from sdk.cli import EdgeGroup, bundle_group, keys_group, runtime_group
from sdk.errors import MissingDependencyError

__all__ = ["cli", "main", "COMMANDS", "LazyCommand", "LazyGroup"]

#: the packages of edgesdk itself: an import of one of them that fails is a bug, not a missing extra
_OWN_PACKAGES = {"sdk", "converter", "agent", "fleet", "edgesdk"}


class LazyCommand(NamedTuple):
    """A command imported only when it runs: where it lives, the extra that brings what it needs,
    and the first paragraph of its help (what ``edgesdk --help`` shows before it is imported)."""

    module: str
    attribute: str
    extra: str
    help: str


COMMANDS: dict[str, LazyCommand] = {
    "convert": LazyCommand("converter.cli", "convert_command", "converter",
                           "Convert MODEL (.keras, .h5, SavedModel dir, .tflite or PyTorch .pt2) into a measured, "
                           "signed bundle."),
    "agent": LazyCommand("agent.cli", "agent_group", "agent",
                         "The on-device agent: serve models, install bundles, report to the fleet."),
    "fleet": LazyCommand("fleet.cli", "fleet_group", "fleet",
                         "The fleet: device registry, staged rollouts, distributed batch inference."),
    "demo": LazyCommand("edgesdk.demo", "demo_command", "demo",
                        "The whole product in a few minutes: train, convert, sign, serve on N agents, roll out a "
                        "version 2 with a canary, and run the digits test set across the fleet."),
}


class LazyGroup(EdgeGroup):
    """A group whose ``lazy`` commands are imported when one of them is resolved (to run it, or
    for its own ``--help``), and listed from their :class:`LazyCommand` entry until then."""

    def __init__(self, *args: Any, lazy: dict[str, LazyCommand], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, name: str) -> click.Command:
        entry = self.lazy[name]
        try:
            module = importlib.import_module(entry.module)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if not missing or missing in _OWN_PACKAGES:
                raise  # edgesdk's own code is broken or half installed: the traceback says where
            raise MissingDependencyError(missing, entry.extra, f"for edgesdk {name}") from exc
        return getattr(module, entry.attribute)

    def _listed(self, name: str) -> click.Command:
        """The command as ``--help`` lists it: itself once imported, else a stand-in with its help."""
        if name in self.commands:
            return self.commands[name]
        return click.Command(name, help=self.lazy[name].help)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with lazy commands described from their entries (nothing is imported)."""
        commands = [(name, self._listed(name)) for name in self.list_commands(ctx)]
        commands = [(name, cmd) for name, cmd in commands if not cmd.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in commands])


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, envvar="EDGESDK_DEBUG", help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.version_option(__version__, prog_name="edgesdk")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """edgesdk: convert models for edge devices, serve them there, and run a fleet of them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _group in (keys_group, bundle_group, runtime_group):
    cli.add_command(_group)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.main(args=argv, prog_name="edgesdk")
