"""The device path stays light: importing sdk, agent or fleet never imports TensorFlow, the
agent's commands load neither the fleet nor the converter, and ``sdk`` imports nothing above it.

Checked in a fresh interpreter (as click's own tests/test_imports.py does), because the test
process itself has TensorFlow loaded by other tests.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("tensorflow", "keras", "tf_keras", "tensorflow_model_optimization", "matplotlib", "torch", "litert_torch",
         "ai_edge_quantizer")


@pytest.mark.parametrize(
    "modules",
    [
        "sdk",
        "agent",
        "fleet, fleet.cli, fleet.sim",
        "sdk, sdk.runtime, sdk.bundle, sdk.golden, sdk.modelinfo, sdk.signing, sdk.latency",
        "sdk.cli",  # the commands every role shares
        "edgesdk, edgesdk.cli",  # the CLI root: every role's commands listed, none imported
        "converter",  # the converter package imports TensorFlow only when a conversion runs
    ],
)
def test_import_does_not_pull_in_tensorflow(modules: str) -> None:
    code = (
        f"import sys, json; import {modules}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_runtime_loader_prefers_litert_without_tensorflow() -> None:
    code = (
        "import sys; from sdk.runtime import find_runtime; rt = find_runtime(); "
        "print(rt.name, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["ai_edge_litert", "False"]


def test_fleet_needs_no_tflite_runtime() -> None:
    """The fleet runs on a server: it imports neither TensorFlow nor LiteRT."""
    code = ("import sys, json; import fleet, fleet.cli, fleet.service; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ai_edge_litert', 'tflite_runtime'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


#: what the agent's commands must not load (the fleet, the converter, and what only they need)
_NOT_ON_DEVICES = ("fleet", "converter", "edgesdk.demo", *HEAVY)


@pytest.mark.parametrize("args", [["agent", "--help"], ["agent", "models", "--help"], ["agent", "status", "--json"],
                                  ["agent", "predict", "digits", "x.npy"]])
def test_the_agents_commands_load_neither_the_fleet_nor_the_converter(args: list[str], tmp_path: Path) -> None:
    """Through the console script's entry point, as a device runs it; ``status`` and ``predict``
    run for real (a stopped agent: its state dir read, the refusal to predict without it)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "light"\nstate_dir = "{tmp_path / "state"}"\n')
    if "--help" not in args:
        args = [*args, "--config", str(cfg)]
    code = ("import atexit, json, sys\n"
            "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
            "from edgesdk.cli import main\n"
            f"main({args!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == (14 if args[1] == "predict" else 0), r.stderr
    loaded = json.loads(r.stderr.strip().splitlines()[-1])
    assert "agent.cli" in loaded
    assert [m for m in loaded if m in _NOT_ON_DEVICES or m.split(".")[0] in _NOT_ON_DEVICES] == []


_ABOVE_SDK = {"agent", "fleet", "converter", "edgesdk"}


def test_sdk_imports_nothing_above_it() -> None:
    """Not even inside a function: sdk is the foundation the roles and the command build on."""
    root = Path(__file__).resolve().parents[1] / "sdk"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in _ABOVE_SDK]
    assert found == []
