"""Inputs that travel compactly: bytes sent per sample and job throughput, against float32 as
given, measured in one run.

    python bench/input_bench.py [--digits-samples 20000] [--wide-samples 1000] [--piece-limit 16384]

For two models converted here (nothing downloaded), one ``edgesdk agent run`` process
(``threads = 1``, ``pool_size = 1``) with both installed, a Mosquitto started here on loopback
(``fleet.broker.EmbeddedBroker``) and the fleet in this process, every row is one ``Fleet.run``
job on the same samples:

* digits CNN, full int8 with int8 I/O, normalisation ``1/16, 0`` recorded: the baseline is float32
  as given (a fleet that holds no bundle of the model, so the agent quantises); then the fleet
  quantising once (int8 on the wire); then uint8 pixels normalised on the device;
* a 48x48x3 float32 model with normalisation ``2/255, -1``: float32 as given (baseline), uint8
  pixels, and both again with the fleet's packet limit at ``--piece-limit`` bytes: a float32
  sample (27 KiB) then travels in pieces reassembled on the device, and uint8 tasks (6.75 KiB a
  sample) are cut to the samples that fit in one message.

Each figure is printed with its baseline beside it and the ratio. bytes/sample is every task
byte the fleet published for the job (all attempts and pieces, frame headers included) over its
samples; samples/s is over the job's own span. The fleet, the broker, the agent and this script
share the machine's cores, so the samples/s ratios are indicative; the byte ratios are exact.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def start_agent(tmp: Path, url: str, public: Path, bundles: list[Path]) -> subprocess.Popen:
    from agent import Agent
    from agent.config import load_config

    cfg = load_config(None, env={}, device_id="bench-in", broker_url=url, state_dir=tmp / "agent",
                      trusted_keys=[str(public)], threads=1, pool_size=1)
    (tmp / "agent.toml").write_text(cfg.to_toml())
    setup = Agent(cfg)
    for b in bundles:
        setup.install(b)
    setup.stop()
    return subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--config", str(tmp / "agent.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wide_model(path: Path) -> None:
    from converter.source import keras

    k = keras()
    k.utils.set_random_seed(0)
    k.Sequential([k.Input((48, 48, 3)), k.layers.Conv2D(4, 3, activation="relu"), k.layers.GlobalAveragePooling2D(),
                  k.layers.Dense(3)]).save(path)


def run_job(tmp: Path, url: str, state: str, model: str, x: np.ndarray, batch: int, *, bundle: Path | None = None,
            max_packet: int | None = None) -> tuple[float, float, list[str], np.ndarray]:
    """One job in a fleet of its own state (``bundle``: the fleet holds it, so it knows the inputs)."""
    import time

    from fleet import Fleet

    options = {"max_packet_size": max_packet} if max_packet else {}
    with Fleet(tmp / state, url, name=f"bench-{state}", tick=0.05, **options) as fleet:
        if bundle is not None:
            fleet.add_bundle(bundle)
        deadline = time.monotonic() + 60
        while not any(d.online and model in d.models for d in fleet.devices()):
            if time.monotonic() > deadline:
                raise SystemExit("the agent did not come online")
            time.sleep(0.1)
        s = fleet.run(model, x, batch_size=batch, timeout=900)
        return s.bytes_per_sample, s.samples_per_s, s.input_encoding, s.outputs[0]


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk: bytes per sample and throughput of compact job inputs")
    ap.add_argument("--digits-samples", type=int, default=20_000)
    ap.add_argument("--wide-samples", type=int, default=1_000)
    ap.add_argument("--piece-limit", type=int, default=16_384)
    args = ap.parse_args()

    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from fleet.broker import EmbeddedBroker
    from sdk.encoding import Normalization
    from sdk.signing import generate_keys

    with tempfile.TemporaryDirectory(prefix="edgesdk-input-bench-") as d:
        tmp = Path(d)
        private, public = generate_keys(tmp / "keys")
        data = load_digits_split()
        cnn, _ = train_digits_cnn(data)
        cnn.save(tmp / "digits.keras")
        np.savez(tmp / "calib.npz", x=data.x_train[:300])
        digits = convert(tmp / "digits.keras", target="cpu", quantize="int8", io_dtype="int8", calibration=tmp / "calib.npz",
                         key=private, output=tmp / "digits.edgebundle", runs=5, input_normalization=(1 / 16, 0.0))
        wide_model(tmp / "wide.keras")
        wide = convert(tmp / "wide.keras", target="cpu", quantize="none", key=private, output=tmp / "wide.edgebundle",
                       runs=3, name="wide", input_normalization=(2 / 255, -1.0))
        broker = EmbeddedBroker("mosquitto").start()
        agent = start_agent(tmp, broker.url, public, [digits.bundle_path, wide.bundle_path])
        try:
            rng = np.random.default_rng(0)
            idx = rng.integers(0, len(data.x_test), args.digits_samples)
            dx = data.x_test[idx].astype(np.float32)
            dpx = np.rint(dx * 16).astype(np.uint8)
            wpx = rng.integers(0, 256, size=(args.wide_samples, 48, 48, 3), dtype=np.uint8)
            wx = Normalization(2 / 255, -1.0).apply(wpx)
            rows = [
                ("digits", "float32 as given (baseline)", run_job(tmp, broker.url, "d0", "digits", dx, 256)),
                ("digits", "int8, quantised by the fleet", run_job(tmp, broker.url, "d1", "digits", dx, 256,
                                                                   bundle=digits.bundle_path)),
                ("digits", "uint8 pixels, normalised on the device", run_job(tmp, broker.url, "d2", "digits", dpx, 256,
                                                                             bundle=digits.bundle_path)),
                ("wide", "float32 as given (baseline)", run_job(tmp, broker.url, "w0", "wide", wx, 8,
                                                                bundle=wide.bundle_path)),
                ("wide", "uint8 pixels, normalised on the device", run_job(tmp, broker.url, "w1", "wide", wpx, 8,
                                                                           bundle=wide.bundle_path)),
                ("wide", f"float32, packet limit {args.piece_limit} B: 1 sample a task, in pieces",
                 run_job(tmp, broker.url, "w2", "wide", wx, 8, bundle=wide.bundle_path, max_packet=args.piece_limit)),
                ("wide", f"uint8, packet limit {args.piece_limit} B: tasks cut to fit",
                 run_job(tmp, broker.url, "w3", "wide", wpx, 8, bundle=wide.bundle_path, max_packet=args.piece_limit)),
            ]
        finally:
            agent.terminate()
            agent.wait(30)
            broker.stop()
    print("| model | inputs | encoding | bytes/sample | baseline | ratio | samples/s | baseline | ratio | same outputs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base: dict[str, tuple[float, float, np.ndarray]] = {}
    for model, label, (bps, rate, enc, out) in rows:
        b = base.setdefault(model, (bps, rate, out))
        same = "yes" if np.allclose(out, b[2], atol=1e-5) else f"max diff {np.max(np.abs(out - b[2])):.2g}"
        print(f"| {model} | {label} | {', '.join(enc)} | {bps:,.1f} | {b[0]:,.1f} | {bps / b[0]:.3f} | {rate:,.0f} | "
              f"{b[1]:,.0f} | {rate / b[1]:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
