"""PyTorch sources with real torch, litert-torch and ai-edge-quantizer: a small CNN (BatchNorm, a
residual connection) trained on digits, converted float and int8, judged against the PyTorch
model's own accuracy, then served by a real agent; and a ``.pt2`` archive through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import litert_torch  # noqa: E402,F401  (the [torch] extra: .ci/setup installs it; missing fails, never skips)
import torch  # noqa: E402

nn = torch.nn

from converter import convert  # noqa: E402
from sdk.dataset import Dataset  # noqa: E402


class ResidualCNN(nn.Module):
    """conv-BN-ReLU, a residual conv-BN block, pooling, a linear classifier (NCHW, 1x8x8)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = nn.functional.max_pool2d(h, 2)
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def trained(digits):
    """The CNN trained for a few epochs on the digits' NCHW images; its own test accuracy."""
    torch.manual_seed(0)
    model = ResidualCNN()
    x = torch.from_numpy(digits.x_train.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    x_test = digits.x_test.transpose(0, 3, 1, 2).copy()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == digits.y_test).mean())
    return model, acc


def _data(digits, nhwc: bool = False) -> tuple[Dataset, Dataset]:
    x_train = digits.x_train if nhwc else digits.x_train.transpose(0, 3, 1, 2).copy()
    x_test = digits.x_test if nhwc else digits.x_test.transpose(0, 3, 1, 2).copy()
    return (Dataset([x_train[:200]], None, "digits train"), Dataset([x_test], digits.y_test, "digits test"))


def test_float_and_int8_against_the_torch_model(trained, digits, tmp_path, signing_keys, agent_config) -> None:
    model, torch_acc = trained
    assert torch_acc > 0.9
    calib, test = _data(digits)
    result = convert(model, sample_inputs=(torch.zeros(1, 1, 8, 8),), quantize="int8", calibration=calib,
                     eval_data=test, output=tmp_path / "torch.edgebundle", key=signing_keys.private, runs=10,
                     name="torchdigits")
    report = result.report
    assert report["source"]["kind"] == "torch" and "NCHW" in report["source"]["input_layout"]
    rows = {r["label"]: r for r in report["candidates"]}
    fp32, int8 = rows["float32"], rows["int8 (int8 I/O)"]
    # the reference is the PyTorch model's own accuracy on the same samples
    assert fp32["reference_accuracy"] == pytest.approx(torch_acc)
    assert fp32["max_abs_error"] < 1e-3 and fp32["accuracy"] == pytest.approx(torch_acc)
    assert int8["accuracy"] >= torch_acc - 0.02
    assert int8["size_bytes"] < fp32["size_bytes"] / 2
    print("\nTORCH-FIGURES", torch_acc, {k: (r["size_bytes"], r["max_abs_error"], r["accuracy"], r["latency"]["p50_ms"])
                                        for k, r in rows.items()})
    assert result.manifest.data["inputs"][0]["dtype"] == "int8" and result.manifest.data["inputs"][0]["shape"] == [1, 1, 8, 8]

    from agent import Agent

    agent = Agent(agent_config).start(local_api=False)
    try:
        agent.install(result.bundle_path)
        x = test.xs[0]
        preds = [int(np.argmax(agent.predict("torchdigits", [x[i:i + 1]])[0])) for i in range(len(x))]
    finally:
        agent.stop()
    assert float(np.mean(np.array(preds) == digits.y_test)) >= torch_acc - 0.02


def test_int8_with_uint8_io_for_cameras_and_the_edge_tpu(trained, digits, tmp_path) -> None:
    model, torch_acc = trained
    calib, test = _data(digits)
    result = convert(model, sample_inputs=(torch.zeros(1, 1, 8, 8),), quantize="int8", io_dtype="uint8",
                     calibration=calib, eval_data=test, output=tmp_path / "u8.edgebundle", runs=5, name="torchu8")
    rows = {r["label"]: r for r in result.report["candidates"]}
    assert rows["int8 (uint8 I/O)"]["accuracy"] >= torch_acc - 0.02
    inp, out = result.manifest.data["inputs"][0], result.manifest.data["outputs"][0]
    assert (inp["dtype"], out["dtype"]) == ("uint8", "uint8") and inp["shape"] == [1, 1, 8, 8]
    # the same scale as the int8 model's input, its zero point moved by 128
    assert 0 <= inp["zero_point"] <= 255 and inp["scale"] > 0


def test_auto_channels_last_pt2_through_the_cli(trained, digits, tmp_path, edgesdk_cli) -> None:
    model, _ = trained
    program = torch.export.export(model, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, tmp_path / "digits.pt2")
    calib, test = _data(digits, nhwc=True)
    np.savez(tmp_path / "calib.npz", x=calib.xs[0])
    np.savez(tmp_path / "test.npz", x=test.xs[0], y=test.y)
    proc = edgesdk_cli("convert", str(tmp_path / "digits.pt2"), "--channels-last", "--quantize", "auto",
                       "--calibration", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "test.npz"),
                       "--runs", "5", "-o", str(tmp_path / "d.edgebundle"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "NHWC" in report["source"]["input_layout"]
    ok = [r for r in report["candidates"] if r["status"] == "ok"]
    assert {r["recipe"] for r in ok} >= {"none", "dynamic", "float16", "int8"}
    assert all(r["drop_pts"] <= 1.0 for r in ok if r.get("chosen"))
    print("\nTORCH-FIGURES cli", [(r["label"], r["size_bytes"], round(r["latency"]["p50_ms"], 4), r.get("accuracy"), r.get("chosen")) for r in ok])


def test_bad_pt2_is_one_clear_line(tmp_path, edgesdk_cli) -> None:
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"not an archive")
    proc = edgesdk_cli("convert", str(bad))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "torch.export" in proc.stderr
