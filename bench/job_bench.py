"""One agent's batch-job throughput against a bare ``invoke`` loop on the same model, one run.

For two models built and converted here (the converter API; nothing downloaded):

* the digits CNN (converter/digits.py), full int8: a ~3-10 µs model, where per-sample and
  per-task overhead shows;
* a landmark-style 64x64x3 float32 Keras CNN with two outputs (68 points and a score), its width
  tuned so one ``invoke`` takes about 1 ms on this machine, converted with the input
  normalisation ``x / 255`` recorded (``input_normalization=(1/255, 0)``), as an image model is;

the bench measures, in the same run,

* the baseline: a bare ``set_tensor``/``invoke``/``get_tensor`` loop on an interpreter of our own
  (LiteRT, one thread, batch 1, the same .tflite, inputs already in the model's dtype), measured
  before and after each job (the mean is the baseline; both sides see the same load), and
  beside it the same loop with the whole task in one ``invoke`` (batch = the job's task size),
  to show how much of the job's rate batched ``invoke`` buys;
* the agent job: one ``edgesdk agent run`` process (``threads = 1``, ``pool_size = 1``) doing a
  ``Fleet.run`` job over a Mosquitto started here on loopback (``fleet.broker.EmbeddedBroker``),
  samples/s over the job's own span (first dispatch to last result, the job summary's figure;
  the median of ``--repeat`` jobs, their spread beside it), and, beside it, over the whole
  ``Fleet.run`` call (submit, store inputs, wait, collect outputs).

Cases, each with a fresh fleet state and agent:

* the inputs as a practitioner sends them: the fleet holds the bundle (as after ``edgesdk fleet
  deploy``), so digits travel as int8 quantised once by the fleet and landmark images as uint8
  normalised on the device; the default agent (``prefetch = 4``, more while tasks are short)
  and, to show what prefetch buys, ``prefetch = 0``;
* float32 on the wire: the fleet does not hold the bundle, so inputs travel as given (the agent
  quantises the digits itself), 4x the bytes per sample.

Task sizes: ``--batch-size`` samples, cut to what fits one message under the broker's packet
limit (256 KiB by default): about 4,000 int8 digits, 1,000 float32 digits, 21 uint8 or 5 float32
landmark images per task.

The fleet, the broker, the agent and this script share the machine's cores: on 2 cores that is
part of what the ratio shows.

    python bench/job_bench.py [--digits-samples 400000] [--landmark-samples 6000] [--batch-size 4096] [--repeat 3]
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
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _fleet_bench():
    """bench/fleet_bench.py as a module: its digits bundle is the one this bench uses too."""
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


def _model_inputs(it, x: np.ndarray) -> np.ndarray:
    """``x`` in the model's own dtype: quantised for an integer input, ``/ 255`` for uint8 images
    going to a float input (what the agent does with the normalisation the manifest records)."""
    ind = it.get_input_details()[0]
    scale, zero = ind["quantization"]
    if scale:
        info = np.iinfo(ind["dtype"])
        x = np.clip(np.rint(x / scale) + zero, info.min, info.max)
    elif x.dtype == np.uint8 and np.dtype(ind["dtype"]).kind == "f":
        x = x.astype(np.float32) / 255.0
    return np.ascontiguousarray(x.astype(ind["dtype"]))


def bare_rate(model_bytes: bytes, x: np.ndarray, seconds: float = 2.0, batch: int = 1) -> tuple[float, float]:
    """Samples/s of the bare loop (one thread; ``batch`` samples per ``invoke``, batch 1 unless
    said) and its median ms per invoke."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes, num_threads=1)
    idx = it.get_input_details()[0]["index"]
    if batch > 1:
        it.resize_tensor_input(idx, [batch, *x.shape[1:]])
    it.allocate_tensors()
    outs = [d["index"] for d in it.get_output_details()]
    data = _model_inputs(it, x[: max(256, batch)])
    samples = [data[s : s + batch] for s in range(0, len(data) - batch + 1, batch)]
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
        n += len(samples) * batch
    ms = 1000 * float(np.median(times))
    return batch * 1000 / ms, ms


def tune_landmark(target_ms: float = 1.0) -> tuple[int, object]:
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
    return subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--config", str(tmp / f"{name}.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Case:
    """One row: a model, its job inputs, and how the fleet and the agent are set up."""

    model: str
    label: str
    bundle: Path
    x: np.ndarray
    batch: int
    prefetch: int
    fleet_holds_bundle: bool  # the fleet encodes inputs as the model takes them (int8, uint8 images)
    wire: str


def run_case(case: Case, tmp: Path, url: str, public: Path, repeat: int, key: str) -> dict:
    """Bare loop, the agent's job ``repeat`` times, bare loop again; the row's figures."""
    from fleet import Fleet
    from sdk.bundle import Bundle

    model_bytes = Bundle.open(case.bundle).model_bytes()
    bare_before, ms_before = bare_rate(model_bytes, case.x)
    proc = start_agent(tmp, f"agent-{key}", url, public, case.bundle, case.prefetch)
    try:
        with Fleet(tmp / f"fleet-{key}", url) as fleet:
            if case.fleet_holds_bundle:
                fleet.add_bundle(case.bundle)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(d.online and d.models and d.id == f"agent-{key}"
                                                          for d in fleet.devices()):
                time.sleep(0.2)
            fleet.run(case.model, case.x[: max(case.batch * 8, len(case.x) // 20)], batch_size=case.batch,
                      timeout=600)  # warm-up
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                res = fleet.run(case.model, case.x, batch_size=case.batch, timeout=600)
                runs.append((res.samples_per_s, len(case.x) / (time.perf_counter() - t0), res))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    bare_after, ms_after = bare_rate(model_bytes, case.x)  # before and after: drift is shared
    runs.sort(key=lambda r: r[0])
    rate, wall, res = runs[len(runs) // 2]
    task = int(res.task_samples or case.batch)
    batched, _ = bare_rate(model_bytes, case.x, seconds=1.0, batch=task)
    busy = next(iter(res.devices.values()))["throughput"] if res.devices else 0.0
    return {"rate": rate, "low": runs[0][0], "high": runs[-1][0], "wall": wall, "bare": (bare_before + bare_after) / 2,
            "bare_range": (bare_before, bare_after), "ms": (ms_before + ms_after) / 2, "batched": batched,
            "task": task, "retries": res.retries, "busy": busy, "bytes": res.bytes_per_sample or 0.0,
            "encoding": ", ".join(res.input_encoding)}


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk job throughput: one agent against a bare invoke loop")
    ap.add_argument("--digits-samples", type=int, default=400_000)
    ap.add_argument("--landmark-samples", type=int, default=6_000)
    ap.add_argument("--batch-size", type=int, default=4096, help="samples per task asked for (tasks are cut to the "
                    "broker's packet limit): a large one suits a model of microseconds per sample")
    ap.add_argument("--repeat", type=int, default=3, help="jobs per case; the median is reported, the spread beside it")
    ap.add_argument("--only", choices=("digits", "landmark"), help="one model only")
    args = ap.parse_args()

    from converter import convert
    from fleet.broker import EmbeddedBroker
    from sdk.signing import generate_keys

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        private, public = generate_keys(tmp / "keys")
        cases: list[Case] = []
        if args.only in (None, "digits"):
            bundle, digits = _fleet_bench().digits_bundle(tmp, private, runs=3)
            x = np.concatenate([digits.x_test] * (args.digits_samples // len(digits.x_test) + 1))[: args.digits_samples]
            label = "digits CNN, int8"
            cases += [Case("digits", label, bundle, x, args.batch_size, 4, True, "int8, quantised by the fleet"),
                      Case("digits", label, bundle, x, args.batch_size, 0, True, "int8, quantised by the fleet"),
                      Case("digits", label, bundle, x, args.batch_size, 4, False, "float32 (the agent quantises)")]
        if args.only in (None, "landmark"):
            width, lm = tune_landmark()
            lm.save(tmp / "landmark.keras")
            bundle = convert(tmp / "landmark.keras", target="cpu", quantize="none", key=private,
                             output=tmp / "landmark.edgebundle", runs=3, input_normalization=(1 / 255, 0.0)).bundle_path
            images = np.random.default_rng(0).integers(0, 256, (args.landmark_samples, 64, 64, 3), dtype=np.uint8)
            label = f"landmark CNN 64x64x3 float32, width {width}, two outputs"
            wire = "uint8 images, x/255 on the device"
            cases += [Case("landmark", label, bundle, images, args.batch_size, 4, True, wire),
                      Case("landmark", label, bundle, images, args.batch_size, 0, True, wire),
                      Case("landmark", label, bundle, (images / np.float32(255)).astype(np.float32), args.batch_size, 4,
                           False, "float32")]
        broker = EmbeddedBroker("mosquitto").start()
        try:
            for k, case in enumerate(cases):
                rows.append((case, run_case(case, tmp, broker.url, public, args.repeat, str(k))))
        finally:
            broker.stop()

    load = os.getloadavg()
    print(f"# edgesdk job_bench — one agent (threads 1, pool 1), Mosquitto on loopback, {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} at the end")
    print(f"# python bench/job_bench.py {' '.join(sys.argv[1:])}\n")
    print("| model | on the wire | agent prefetch | agent job samples/s (median; spread) | bare loop samples/s "
          "(batch 1) | ratio | bare loop, one invoke per task | job incl. submit and collect | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, r in rows:
        prefetch = "4 (more while tasks are short)" if case.prefetch else "0 (none)"
        print(f"| {case.label} | {case.wire} | {prefetch} | {r['rate']:,.0f} ({r['low']:,.0f}-{r['high']:,.0f}) | "
              f"{r['bare']:,.0f} (before {r['bare_range'][0]:,.0f}, after {r['bare_range'][1]:,.0f}) | "
              f"**{r['rate'] / r['bare']:.2f}** | {r['batched']:,.0f} ({r['rate'] / r['batched']:.2f}) | "
              f"{r['wall']:,.0f} ({r['wall'] / r['bare']:.2f}) | {len(case.x):,} samples, tasks of {r['task']}, "
              f"{r['bytes']:,.0f} bytes/sample sent ({r['encoding']}), bare invoke {r['ms']:.3f} ms, retries "
              f"{r['retries']}; the agent's own rate while running tasks {r['busy']:,.0f} samples/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
