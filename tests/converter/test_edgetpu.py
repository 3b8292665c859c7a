"""Edge TPU compiler wiring. The real compiler only exists in Coral's apt repository (x86-64), not
on this machine: the not-installed path is tested for real; the compile path is tested with a
stand-in executable that behaves like edgetpu_compiler's file interface (it copies the model)."""

import os
import stat

import pytest

from converter import convert
from sdk.bundle import EDGETPU_MODEL_NAME, Bundle

STAND_IN = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Edge TPU Compiler version 16.0.384591198 (stand-in)"; exit 0; fi
# edgetpu_compiler -s -o OUTDIR MODEL
out="$3"; model="$4"; base=$(basename "$model" .tflite)
cp "$model" "$out/${base}_edgetpu.tflite"
printf 'Operator  Count  Status\\nCONV_2D  2  Mapped to Edge TPU\\n' > "$out/${base}_edgetpu.log"
echo "Model compiled successfully"
"""


def _install(tmp_path, body):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "edgetpu_compiler"
    exe.write_text(body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_compiler_not_installed_is_said_plainly(digits_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    res = convert(digits_model.path, target="edgetpu", calibration=digits_model.calibration,
                  output=tmp_path / "e.edgebundle", runs=5)
    assert res.report["edgetpu_compiler"]["status"] == "compiler-not-found"
    assert "not on PATH" in res.report["edgetpu_compiler"]["message"]
    assert EDGETPU_MODEL_NAME not in Bundle.open(res.bundle_path).manifest.files


def test_compiled_model_and_log_travel_in_the_bundle(digits_model, tmp_path, monkeypatch) -> None:
    bindir = _install(tmp_path, STAND_IN)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    res = convert(digits_model.path, target="edgetpu", calibration=digits_model.calibration,
                  output=tmp_path / "e.edgebundle", runs=5)
    assert res.report["edgetpu_compiler"]["status"] == "compiled"
    assert "16.0" in res.report["edgetpu_compiler"]["compiler_version"]
    b = Bundle.open(res.bundle_path)
    assert b.model_bytes(edgetpu=True) == res.model  # the stand-in copies the model
    assert b"Mapped to Edge TPU" in b.read("edgetpu_compiler.log")


def test_failing_compiler_is_reported(digits_model, tmp_path, monkeypatch) -> None:
    bindir = _install(tmp_path, "#!/bin/sh\necho 'Internal compiler error. Aborting!' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    res = convert(digits_model.path, target="edgetpu", calibration=digits_model.calibration,
                  output=tmp_path / "e.edgebundle", runs=5)
    assert res.report["edgetpu_compiler"]["status"] == "failed"
    assert "Aborting" in res.report["edgetpu_compiler"]["message"]


def test_edgetpu_refuses_float_recipes(digits_model, tmp_path) -> None:
    from sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="fully integer"):
        convert(digits_model.path, target="edgetpu", quantize="float16", output=tmp_path / "x.edgebundle")
