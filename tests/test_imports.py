"""The device path stays light: importing sdk, agent or fleet never imports TensorFlow.

Checked in a fresh interpreter (as click's own tests/test_imports.py does), because the test
process itself has TensorFlow loaded by other tests.
"""

import json
import subprocess
import sys

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
        "sdk.cli",  # the CLI root (with the convert command attached) stays light too
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
