"""Agent serving overhead: bare ``invoke()`` vs ``Agent.predict`` vs ``AgentClient`` over the socket.

For the digits CNN (a ~15 µs model: what remains is the per-request overhead itself) and
MobileNetV2 1.0/224 (random weights, BatchNorm statistics set from real photos, see
convert_bench.py), each converted to float32 and to full int8, one run measures, interleaved in
blocks so drift is shared:

* bare: ``set_tensor`` + ``invoke()`` + ``get_tensor`` on an interpreter of our own (the baseline);
* the same on a second interpreter of the same model: the null comparison, i.e. how far two
  identical paths land apart in this run (the resolution of every other row);
* ``Agent.predict(raw=True)``: the in-process path (pool checkout, input checks, stats);
* ``Agent.predict``: the same with float in/out (quantize/dequantize for the int8 model);
* bare ``invoke()`` with the application's own quantize/dequantize (``sdk.runtime``'s, the same
  arithmetic): the baseline for the float I/O row, which does that conversion work for the caller
  (for a float32 model it is the bare path with a no-op conversion);
* ``AgentClient.predict(raw=True)``: the local Unix-socket API (framing, thread hop; inputs of
  64 KB or more copied into the shared-memory region), to an agent running as its own process
  (``edgesdk agent run --no-mqtt``), as applications use it;
* the same with the input in an ``AgentClient.buffer()`` (filled once; an application writes its
  preprocessed input there instead of into an array of its own): no copy on the client side;
* the IPC floor (``bench/ipc_floor.py``): a minimal server process, its input in shared memory,
  16-byte requests, no framing or checks — the least a cross-process call costs on this machine,
  so the socket rows minus this row is edgesdk's own cost.

    python bench/agent_bench.py [--runs 200] [--threads 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ipc_floor import FloorClient  # noqa: E402


def _convert_bench():
    spec = importlib.util.spec_from_file_location("convert_bench", Path(__file__).with_name("convert_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk agent serving benchmark")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="at least this long per model (a steadier p50)")
    args = ap.parse_args()

    from agent import Agent, AgentClient
    from agent.config import load_config
    from converter import convert
    from sdk.bundle import Bundle
    from sdk.latency import measure_interleaved
    from sdk.runtime import DelegateOptions, find_runtime, open_engine, quantize
    from sdk.signing import generate_keys

    rt = find_runtime()
    print(f"# edgesdk agent_bench — {rt.name} {rt.version}, {args.threads} threads, batch 1, at least {args.runs} "
          f"runs per path, interleaved in blocks of 10, {os.cpu_count()} cores\n")
    print("| model | path | p50 ms | p99 ms | p50 overhead vs bare |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cb = _convert_bench()
        private, public = generate_keys(tmp / "keys")
        bundles = {}
        inputs = {}
        for model_name, build in (("digits", cb.digits_model), ("mnv2", cb.mobilenet_model)):
            keras_path, calib, _ = build(tmp)
            for recipe in ("none", "int8"):
                res = convert(keras_path, target="cpu", quantize=recipe, calibration=calib, key=private, runs=5,
                              output=tmp / f"{model_name}-{recipe}.edgebundle", calibration_limit=64,
                              name=f"{model_name}_{recipe}")
                bundles[f"{model_name}_{recipe}"] = res.bundle_path
                inputs[f"{model_name}_{recipe}"] = np.load(calib)["x"][:1]
        cfg = load_config(None, env={}, device_id="bench", state_dir=tmp / "state", trusted_keys=[str(public)],
                          threads=args.threads, pool_size=1, delegate="cpu")
        agent = Agent(cfg).start(local_api=False)
        for path in bundles.values():
            agent.install(path)
        cfg_file = tmp / "agent.toml"
        cfg_file.write_text(cfg.to_toml())
        proc = subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--no-mqtt", "--config", str(cfg_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not cfg.socket_path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            for name, path in bundles.items():
                x_float = inputs[name]
                model = Bundle.open(path).model_bytes()
                bare, twin = (open_engine(model, "cpu", DelegateOptions(num_threads=args.threads)) for _ in range(2))
                x_raw = quantize(x_float, bare.inputs[0])

                floor_sock = tmp / f"floor-{name}.sock"
                floor_proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ipc_floor.py")),
                                               "--bundle", str(path), "--socket", str(floor_sock),
                                               "--threads", str(args.threads)], stderr=subprocess.DEVNULL)
                while not floor_sock.exists() and floor_proc.poll() is None:
                    time.sleep(0.05)
                out_nbytes = int(np.prod(bare.outputs[0].shape)) * np.dtype(bare.outputs[0].dtype).itemsize
                floor = FloorClient(str(floor_sock), x_raw, out_nbytes)
                client = AgentClient(cfg.socket_path)
                buf = client.buffer(x_raw.shape, x_raw.dtype)
                buf[...] = x_raw
                paths = {
                    "bare invoke()": _bare_invoke(bare, x_raw),
                    "bare invoke(), a second interpreter": _bare_invoke(twin, x_raw),
                    "Agent.predict(raw=True)": lambda: agent.predict(name, [x_raw], raw=True),
                    "Agent.predict (float I/O)": lambda: agent.predict(name, [x_float]),
                    "bare invoke() + own quantize/dequantize": _bare_invoke(bare, x_float, float_io=True),
                    "AgentClient socket (raw)": lambda: client.predict(name, [x_raw], raw=True),
                    "AgentClient socket, buffer() input": lambda: client.predict(name, [buf], raw=True),
                    "IPC floor (bench/ipc_floor.py)": floor,
                }
                stats = measure_interleaved(paths, warmup=10, runs=args.runs, min_seconds=args.seconds)
                base = stats["bare invoke()"]
                own = stats["bare invoke() + own quantize/dequantize"]
                model_name, recipe = name.split("_")
                label = ("digits CNN" if model_name == "digits" else "MobileNetV2") + (
                    " float32" if recipe == "none" else " int8")
                for key, st in stats.items():
                    over = "baseline" if key == "bare invoke()" else (
                        f"{(st.p50_ms - base.p50_ms) * 1000:+.0f} µs ({100 * (st.p50_ms / base.p50_ms - 1):+.1f} %)")
                    if key == "Agent.predict (float I/O)":
                        over += f"; {(st.p50_ms - own.p50_ms) * 1000:+.0f} µs vs own quantize/dequantize"
                    print(f"| {label} | {key} | {st.p50_ms:.3f} | {st.p99_ms:.3f} | {over} |")
                client.close()
                floor.close()
                floor_proc.wait(30)
        finally:
            proc.terminate()
            proc.wait(30)
            agent.stop()
    return 0


def _bare_invoke(engine, x, float_io=False):
    """``set_tensor`` + ``invoke()`` + ``get_tensor`` on an interpreter of the bench's own; with
    ``float_io`` the caller quantizes ``x`` and dequantizes the output itself (``sdk.runtime``'s
    arithmetic, the agent's own)."""
    from sdk.runtime import dequantize, quantize

    it = engine.interpreter
    in_idx = it.get_input_details()[0]["index"]
    out_idx = it.get_output_details()[0]["index"]
    in_spec, out_spec = engine.inputs[0], engine.outputs[0]

    def run():
        it.set_tensor(in_idx, x)
        it.invoke()
        return it.get_tensor(out_idx)

    def run_float():
        it.set_tensor(in_idx, quantize(x, in_spec))
        it.invoke()
        return dequantize(it.get_tensor(out_idx), out_spec)

    return run_float if float_io else run


if __name__ == "__main__":
    sys.exit(main())
