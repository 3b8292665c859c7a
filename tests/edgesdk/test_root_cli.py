"""The ``edgesdk`` root: role commands attached lazily, listed from a static table that must say
what the commands themselves say, and a role whose extra is missing named in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from edgesdk.cli import COMMANDS, LazyGroup


def help_text(group: click.Group) -> str:
    return group.get_help(click.Context(group, info_name="edgesdk", terminal_width=100, max_content_width=100))


def test_the_static_table_says_what_each_command_says() -> None:
    listed = help_text(LazyGroup("edgesdk", lazy=COMMANDS))  # a fresh root: nothing imported through it yet
    loaded = LazyGroup("edgesdk", lazy=COMMANDS)
    for name, entry in COMMANDS.items():
        command = loaded.get_command(click.Context(loaded), name)
        assert " ".join(command.help.split("\n\n")[0].split()) == entry.help, name
    assert help_text(loaded) == listed  # the listing is the same before and after the imports


def test_root_help_lists_every_role_without_importing_one() -> None:
    code = ("import sys, json, contextlib, io\n"
            "from edgesdk.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(json.dumps([out.getvalue(), sorted(m for m in sys.modules if m.split('.')[0] in "
            "('agent', 'fleet', 'converter') or m == 'edgesdk.demo')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    text, loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded == []
    for name in ("agent", "bundle", "convert", "demo", "fleet", "keys", "runtime"):
        assert f"\n  {name} " in text


def test_a_role_whose_extra_is_missing_is_named_in_one_line() -> None:
    code = ("import sys\n"
            "sys.modules['paho'] = None  # as in the converter's environment, which has no paho-mqtt\n"
            "from edgesdk.cli import main\n"
            "main(['fleet', 'devices'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: Python package 'paho' is not installed") and "pip install 'edgesdk[fleet]'" in line


def test_a_command_module_that_cannot_be_imported_for_a_missing_package_names_the_extra() -> None:
    from sdk.errors import MissingDependencyError

    group = LazyGroup("edgesdk", lazy={"x": COMMANDS["fleet"]._replace(module="not_installed_here.cli")})
    with pytest.raises(MissingDependencyError, match=r"'not_installed_here' is not installed \(for edgesdk x\): run "
                                                     r"pip install 'edgesdk\[fleet\]'"):
        group.get_command(click.Context(group), "x")


def test_a_broken_module_of_edgesdk_itself_is_not_blamed_on_an_extra() -> None:
    group = LazyGroup("edgesdk", lazy={"broken": COMMANDS["agent"]._replace(module="agent.no_such_module")})
    with pytest.raises(ModuleNotFoundError, match="agent.no_such_module"):
        group.get_command(click.Context(group), "broken")


def test_python_m_sdk_says_where_the_command_went() -> None:
    r = subprocess.run([sys.executable, "-m", "sdk", "agent", "run"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: `python -m sdk` is now `python -m edgesdk` (the edgesdk command); a systemd unit that runs it was "
        "written by an older edgesdk: run edgesdk agent install again"]
