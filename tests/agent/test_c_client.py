"""The local API from another language: the C client in ``clients/c`` (written from
``docs/local-api.md``), built with gcc here and run against a real agent process; its outputs
must be the Python client's for the same inputs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent import AgentClient

C_DIR = Path(__file__).resolve().parents[2] / "clients" / "c"


@pytest.fixture(scope="module")
def c_predict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clients/c``'s example, compiled with every warning an error (CI installs gcc: .ci/setup)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing: run .ci/setup (apt-get install -y gcc libc6-dev)")
    out = tmp_path_factory.mktemp("c-client") / "edgesdk_predict"
    sources = [str(C_DIR / "predict.c"), str(C_DIR / "edgesdk_client.c")]
    r = subprocess.run([gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(out), *sources,
                        "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def c_outputs(text: str) -> list[np.ndarray]:
    """The example's printout: ``output I DTYPE D0,D1,...`` then one value a line."""
    lines, outputs = text.splitlines(), []
    while lines:
        _, _, dtype, *dims = lines.pop(0).split()
        shape = [int(d) for d in dims[0].split(",")] if dims else []
        count = math.prod(shape)
        values, lines = lines[:count], lines[count:]
        outputs.append(np.array([float(v) for v in values], dtype=np.float64).astype(dtype).reshape(shape))
    return outputs


def test_the_c_client_gets_what_the_python_client_gets(c_predict, agent_toml, preinstall, agent_process, digits_bundle,
                                                       digits, tmp_path) -> None:
    cfg_path = agent_toml("c-dev", "mqtt://127.0.0.1:1")
    cfg = preinstall(cfg_path, digits_bundle.path)
    agent_process(cfg_path, "--no-mqtt")
    sock = str(cfg.socket_path)

    def run_c(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(c_predict), sock, *map(str, args)], capture_output=True, text=True, timeout=60)

    with AgentClient(cfg.socket_path) as client:
        for i in range(3):
            x = digits.x_test[i][None].astype(np.float32)
            x.tofile(tmp_path / "x.raw")
            r = run_c("digits", tmp_path / "x.raw", "float32", "1,8,8,1")
            assert r.returncode == 0, r.stderr
            (got,) = c_outputs(r.stdout)
            (want,) = client.predict("digits", [x])
            assert got.dtype == want.dtype and got.shape == want.shape == (1, 10)
            np.testing.assert_array_equal(got, want)

    pong = run_c("--json", "ping")
    assert pong.returncode == 0 and json.loads(pong.stdout) == "pong"
    status = run_c("--json", "status")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["running"] is True and [(m["name"], m["active"]) for m in s["models"]] == [("digits", "1")]

    # the agent's refusals arrive as its one-line reason
    r = run_c("nope", tmp_path / "x.raw", "float32", "1,8,8,1")
    assert r.returncode == 1 and r.stderr == "error: no model named 'nope' is active (active: digits)\n"
    np.zeros((1, 8, 8), np.float32).tofile(tmp_path / "flat.raw")
    r = run_c("digits", tmp_path / "flat.raw", "float32", "1,8,8")
    assert r.returncode == 1 and "must have shape [1, 8, 8, 1], got [1, 8, 8]" in r.stderr
    r = run_c("digits", tmp_path / "flat.raw", "float32", "1,8,8,2")  # the bytes do not match: never sent
    assert r.returncode == 2 and "does not match its dtype and dims" in r.stderr
