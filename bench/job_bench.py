"""One agent's batch-job throughput against a bare ``invoke`` loop on the same model, one run.

For two models built and converted here (the converter API; nothing downloaded):

* the digits CNN (converter/digits.py), full int8 with float I/O on the wire (the agent quantizes
  inputs and dequantizes outputs): a ~10 µs model, where per-sample overhead shows;
* a landmark-style 64x64x3 float32 Keras CNN with two outputs (68 points and a score), its width
  tuned so one ``invoke`` takes about 1 ms on this machine;

the bench measures, in the same run,

* the baseline: a bare ``set_tensor``/``invoke``/``get_tensor`` loop on an interpreter of our own
  (LiteRT, one thread, batch 1, the same .tflite, inputs already in the model's dtype);
* the agent job: one ``edgesdk agent run`` process (``threads = 1``, ``pool_size = 1``) doing a
  ``Fleet.run`` job over a Mosquitto started here on loopback (``fleet.broker.EmbeddedBroker``),
  samples/s over the job's own span (first dispatch to last result, the job summary's figure),
  and, beside it, over the whole ``Fleet.run`` call (submit, store inputs, wait, collect outputs).

The fleet, the broker, the agent and this script share the machine's cores: on 2 cores that is
part of what the ratio shows.

    python bench/job_bench.py [--digits-samples 400000] [--landmark-samples 4000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _fleet_bench():
    """bench/fleet_bench.py as a module: its job_rate helper is the one measurement of a job."""
    spec = importlib.util.spec_from_file_location("fleet_bench", Path(__file__).with_name("fleet_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def landmark_model(width: int):
    """A landmark-style CNN: 64x64x3 in, 136 landmark coordinates and a face score out."""
    import keras

    inp = keras.Input((64, 64, 3))
    x = inp
    for mult in (1, 2, 4):
        x = keras.layers.Conv2D(width * mult, 3, strides=2, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(width * mult, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    points = keras.layers.Dense(136, name="landmarks")(x)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(x)
    return keras.Model(inp, [points, score])


def bare_rate(model_bytes: bytes, x: np.ndarray, seconds: float = 2.0) -> tuple[float, float]:
    """Samples/s of the bare loop (batch 1, one thread) and its median ms per invoke."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes, num_threads=1)
    it.allocate_tensors()
    ind = it.get_input_details()[0]
    outs = [d["index"] for d in it.get_output_details()]
    scale, zero = ind["quantization"]
    samples = x[:256]
    if scale:
        samples = np.clip(np.rint(samples / scale) + zero, -128, 127)
    samples = [s[None].astype(ind["dtype"]) for s in samples]
    idx = ind["index"]
    for s in samples[:20]:
        it.set_tensor(idx, s)
        it.invoke()
    n, times = 0, []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for s in samples:
            it.set_tensor(idx, s)
            it.invoke()
            for o in outs:
                it.get_tensor(o)
        times.append((time.perf_counter() - t0) / len(samples))
        n += len(samples)
    return 1.0 / float(np.median(times)), 1000 * float(np.median(times))


def tune_landmark(tmp: Path, target_ms: float = 1.0) -> tuple[int, object]:
    """The width whose float32 .tflite invokes in about ``target_ms`` here (measured, not guessed)."""
    import tensorflow as tf

    tried = []
    for width in (8, 12, 16, 20, 24, 32, 48):
        m = landmark_model(width)
        tfl = tf.lite.TFLiteConverter.from_keras_model(m).convert()
        _, ms = bare_rate(tfl, np.zeros((1, 64, 64, 3), np.float32), seconds=0.5)
        tried.append((abs(ms - target_ms), width, m))
        if ms >= target_ms:
            break
    _, width, m = min(tried, key=lambda t: t[0])
    return width, m


def start_agent(tmp: Path, name: str, url: str, public: Path, bundle: Path, prefetch: int) -> subprocess.Popen:
    """An ``edgesdk agent run`` process with ``bundle`` installed, threads = 1, pool_size = 1."""
    from agent import Agent
    from agent.config import load_config

    cfg = load_config(None, env={}, device_id=name, broker_url=url, state_dir=tmp / name, trusted_keys=[str(public)],
                      threads=1, pool_size=1, tags={"name": name}, prefetch=prefetch)
    (tmp / f"{name}.toml").write_text(cfg.to_toml())
    setup = Agent(cfg)
    setup.install(bundle)
    setup.stop()
    return subprocess.Popen([sys.executable, "-m", "sdk", "agent", "run", "--config", str(tmp / f"{name}.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk job throughput: one agent against a bare invoke loop")
    ap.add_argument("--digits-samples", type=int, default=400_000)
    ap.add_argument("--landmark-samples", type=int, default=4_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--landmark-batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="jobs per model; the best is reported")
    ap.add_argument("--prefetch", default="4,0", help="the agents' prefetch settings to measure (the first is "
                                                       "the default configuration)")
    args = ap.parse_args()

    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from fleet import Fleet
    from fleet.broker import EmbeddedBroker
    from sdk.bundle import Bundle
    from sdk.signing import generate_keys

    fb = _fleet_bench()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        private, public = generate_keys(tmp / "keys")
        digits = load_digits_split()
        model, _ = train_digits_cnn(digits)
        model.save(tmp / "digits.keras")
        np.savez(tmp / "calib.npz", x=digits.x_train[:300])
        width, lm = tune_landmark(tmp)
        lm.save(tmp / "landmark.keras")
        models = {
            "digits": (convert(tmp / "digits.keras", target="cpu", quantize="int8", calibration=tmp / "calib.npz",
                               key=private, output=tmp / "digits.edgebundle", runs=3).bundle_path,
                       np.concatenate([digits.x_test] * (args.digits_samples // len(digits.x_test) + 1))
                       [: args.digits_samples], args.batch_size, "digits CNN, int8, float I/O"),
            "landmark": (convert(tmp / "landmark.keras", target="cpu", quantize="none", key=private,
                                 output=tmp / "landmark.edgebundle", runs=3).bundle_path,
                         np.random.default_rng(0).random((args.landmark_samples, 64, 64, 3), dtype=np.float32),
                         args.landmark_batch_size, f"landmark CNN 64x64x3 float32, width {width}, two outputs"),
        }
        broker = EmbeddedBroker("mosquitto").start()
        try:
            for (name, (bundle, x, batch, label)), prefetch in ((m, int(p)) for m in models.items()
                                                                 for p in args.prefetch.split(",")):
                model_bytes = Bundle.open(bundle).model_bytes()
                bare_before, ms_before = bare_rate(model_bytes, x)
                proc = start_agent(tmp, f"agent-{name}-{prefetch}", broker.url, public, bundle, prefetch)
                try:
                    with Fleet(tmp / f"fleet-{name}-{prefetch}", broker.url) as fleet:
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline and not any(d.online and d.models and d.id.endswith(
                                f"-{prefetch}") for d in fleet.devices()):
                            time.sleep(0.2)
                        fleet.run(name, x[: max(batch * 8, len(x) // 20)], batch_size=batch, timeout=600)  # warm-up
                        best = None
                        for _ in range(args.repeat):
                            wall, res = fb.job_rate(fleet, name, x, batch)
                            if best is None or res.samples_per_s > best[1].samples_per_s:
                                best = (wall, res)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                bare_after, ms_after = bare_rate(model_bytes, x)  # before and after: drift is shared
                bare, ms = (bare_before + bare_after) / 2, (ms_before + ms_after) / 2
                wall, res = best
                label = f"{label}, prefetch {prefetch}"
                busy = next(iter(res.devices.values()))["throughput"] if res.devices else 0.0
                rows.append((label, len(x), batch, res.samples_per_s, wall, bare, ms, res.retries, busy))
        finally:
            broker.stop()

    print(f"# edgesdk job_bench — one agent (threads 1, pool 1), Mosquitto on loopback, {os.cpu_count()} cores")
    print(f"# python bench/job_bench.py {' '.join(sys.argv[1:])}\n")
    print("| model | agent job samples/s | bare loop samples/s | ratio | job incl. submit and collect | notes |")
    print("|---|---|---|---|---|---|")
    for label, n, batch, rate, wall, bare, ms, retries, busy in rows:
        print(f"| {label} | {rate:,.0f} | {bare:,.0f} | {rate / bare:.2f} | {wall:,.0f} samples/s "
              f"({wall / bare:.2f}) | {n:,} samples, batch {batch}, bare invoke {ms:.3f} ms, retries {retries}; "
              f"the agent's own rate while running tasks {busy:,.0f} samples/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
