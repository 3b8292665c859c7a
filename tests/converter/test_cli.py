"""The CLI through the real entry point (subprocess) and click's runner: exit codes and messages."""

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from edgesdk.cli import cli


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_every_command_has_help(edgesdk_cli) -> None:
    for args in ([], ["convert"], ["keys", "generate"], ["bundle", "inspect"], ["bundle", "verify"],
                 ["bundle", "sign"], ["runtime", "check"]):
        r = CliRunner().invoke(cli, [*args, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, args
    r = edgesdk_cli("--version")
    assert r.returncode == 0 and "edgesdk, version" in r.stdout


def test_keys_convert_sign_verify_end_to_end(digits_model, tmp_path, edgesdk_cli) -> None:
    keys = tmp_path / "keys"
    r = edgesdk_cli("keys", "generate", keys, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["key_id"]
    out = tmp_path / "d.edgebundle"
    r = edgesdk_cli("convert", digits_model.path, "--target", "cpu", "--calibration", digits_model.calibration,
                    "--eval", digits_model.eval, "--key", keys / "private.pem", "-o", out, "--runs", "10", "--json",
                    "--report-dir", tmp_path / "report", "--input-normalization", "1/16,0")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["chosen"] == "int8 (int8 I/O)" and report["bundle"]["signed"]
    assert (tmp_path / "report" / "conversion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "report.json").read_text())["chosen"] == report["chosen"]

    r = edgesdk_cli("bundle", "verify", out, "--public-key", keys / "public.pem")
    assert r.returncode == 0 and r.stdout.startswith("OK: digits@1")
    r = edgesdk_cli("bundle", "inspect", out, "--json")
    manifest = json.loads(r.stdout)["manifest"]
    assert manifest["quantization"]["recipe"] == "int8"
    assert manifest["inputs"][0]["normalization"] == {"scale": 1 / 16, "offset": 0.0}  # x = pixel / 16 on devices

    other = tmp_path / "other"
    edgesdk_cli("keys", "generate", other)
    r = edgesdk_cli("bundle", "verify", out, "--public-key", other / "public.pem")
    assert r.returncode == 9 and "not among the trusted keys" in one_error_line(r.stderr)

    tampered = tmp_path / "t.edgebundle"
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model.tflite":
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(item, data)
    r = edgesdk_cli("bundle", "verify", tampered, "--public-key", keys / "public.pem")
    assert r.returncode == 8 and "does not match the sha256" in one_error_line(r.stderr)


def test_table_output_and_progress(digits_model, tmp_path) -> None:
    r = CliRunner().invoke(cli, ["convert", str(digits_model.path), "--quantize", "auto", "--calibration",
                                 str(digits_model.calibration), "--eval", str(digits_model.eval), "-o",
                                 str(tmp_path / "a.edgebundle"), "--runs", "5"])
    assert r.exit_code == 0, r.output
    assert "recipe" in r.stdout and "int16x8" in r.stdout and "UNSIGNED" in r.stdout
    assert "convert float16" in r.stderr  # the progress bar's step labels


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["MISSING"], 4, "no model at"),
        (["CORRUPT"], 4, "cannot load Keras model"),
        (["MODEL", "--calibration", "BADSHAPE"], 5, "expects [8, 8, 1]"),
        (["MODEL", "--calibration", "NOFILE"], 5, "does not exist"),
        (["MODEL", "--prune", "2"], 2, "between 0 and 1"),
        (["MODEL", "--image-range", "zero,one"], 2, "--image-range"),
        (["MODEL", "--key", "NOFILE"], 11, "cannot read private key"),
        (["MODEL", "--name", "../etc"], 2, "--name '../etc' cannot name a model on devices"),
        (["MODEL", "--model-version", "1 beta"], 2, "--model-version '1 beta' cannot name a model"),
        (["MODEL", "--input-normalization", "1/255"], 2, "give SCALE,OFFSET such as 1/255,0"),
        (["MODEL", "--input-normalization", "0,1"], 2, "input normalization scale must not be 0"),
        (["MODEL", "--input-normalization", "pixels=1/255,0"], 2, "--input-normalization names pixels, but the "
                                                                  "model's inputs are"),
    ],
)
def test_bad_inputs_give_one_clear_line_and_an_exit_code(digits_model, tmp_path, edgesdk_cli, args, code, message) -> None:
    (tmp_path / "corrupt.keras").write_bytes(b"garbage")
    np.savez(tmp_path / "badshape.npz", x=np.zeros((4, 8, 8)))
    subs = {"MISSING": tmp_path / "missing.keras", "CORRUPT": tmp_path / "corrupt.keras", "MODEL": digits_model.path,
            "BADSHAPE": tmp_path / "badshape.npz", "NOFILE": tmp_path / "nofile.npz"}
    r = edgesdk_cli("convert", *[str(subs.get(a, a)) for a in args], "-o", tmp_path / "o.edgebundle")
    assert r.returncode == code, r.stderr
    assert message in one_error_line(r.stderr)


def test_unknown_target_is_a_usage_error(digits_model) -> None:
    r = CliRunner().invoke(cli, ["convert", str(digits_model.path), "--target", "tpu"])
    assert r.exit_code == 2 and "Invalid value for '--target'" in r.output


def test_debug_shows_the_traceback(tmp_path, edgesdk_cli) -> None:
    r = edgesdk_cli("--debug", "convert", tmp_path / "missing.keras")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr


def test_budget_exceeded_prints_what_was_tried(digits_model, digits, tmp_path) -> None:
    np.savez(tmp_path / "dark.npz", x=digits.x_train[:200] * 0.05)
    r = CliRunner().invoke(cli, ["convert", str(digits_model.path), "--quantize", "int8", "--calibration",
                                 str(tmp_path / "dark.npz"), "--eval", str(digits_model.eval),
                                 "--max-accuracy-drop", "1", "-o", str(tmp_path / "x.edgebundle"), "--runs", "5"])
    assert r.exit_code == 7
    assert "int8 (int8 I/O)" in r.stderr and "error: accuracy drop over the budget" in r.stderr


def test_runtime_check_reports_the_delegate(digits_bundle, edgesdk_cli) -> None:
    r = edgesdk_cli("runtime", "check", digits_bundle.path, "--json")
    info = json.loads(r.stdout)
    assert info["delegate"] == "cpu" and info["runtime"]["name"] == "ai_edge_litert" and len(info["fallbacks"]) == 2
    r = edgesdk_cli("runtime", "check", digits_bundle.path, "--delegate", "edgetpu")
    assert r.returncode == 13 and "libedgetpu.so.1" in one_error_line(r.stderr)


@pytest.mark.parametrize(("path", "name"), [("my model.h5", "my-model"), ("_x.keras", "x"), ("résumé v2.keras", "r-sum-v2"),
                                            ("___.keras", "model")])
def test_the_default_model_name_is_the_file_stem_as_an_id(tmp_path, path: str, name: str) -> None:
    from converter.pipeline import default_model_name

    assert default_model_name(tmp_path / path) == name
