"""Fleet throughput against its baselines, measured in one run on a Mosquitto started here.

1. The broker's raw QoS-1 rate: one paho publisher → one paho subscriber, 1 KiB payloads
   (every message acknowledged), no edgesdk code: the baseline for messages per second.
2. The fleet's samples/s for a no-op model: ``--sims`` simulated devices (real protocol,
   zero inference time, echo outputs) and batched tasks; batching lets samples/s pass the raw
   message rate because one task carries ``--batch-size`` samples.
3. Real agents (``edgesdk agent run`` processes, LiteRT, the digits CNN in int8): the same job
   on agent A alone, on agent B alone, then on both; E = T(A+B) / (T(A) + T(B)). All of it shares
   this machine's cores with the broker and the fleet, which is what E then shows.
4. A 5 MiB bundle pushed to 50 simulated devices by a rollout (128 KiB chunks requested within
   each device's window, install reports, acks) against the raw broker transfer of the same
   bytes: a paho publisher sending the 44 chunks to each of 50 topics, one subscriber receiving
   all 2,200 (the 50 simulated devices share one connection too). ``--rounds`` pairs of (raw,
   rollout), each pair measured back to back; the median ratio is the figure. The receiving side
   of both (the raw subscriber, the simulated devices) runs in a process of its own, as devices
   are apart from the fleet: they stand for other machines, and in the fleet's process they
   would take its GIL and CPU (their hashing, their Python per chunk) and charge it to the
   rollout. ``--together`` runs them in this process instead.

    python bench/fleet_bench.py [--sims 4] [--samples 100000] [--batch-size 256]
    python bench/fleet_bench.py --only rollout [--together] [--rounds 3] [--devices 50] [--bundle signed.edgebundle]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _paho_pair(url: str, topic_filter: str, expected: int):
    """A paho subscriber on ``topic_filter`` that sets an event after ``expected`` messages, and a
    paho publisher; both connected (MQTT 5, no edgesdk code)."""
    import paho.mqtt.client as mqtt

    port = int(url.rsplit(":", 1)[1])
    done = threading.Event()
    count = [0]

    def on_message(c, u, m):
        count[0] += 1
        if count[0] == expected:
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(topic_filter, qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)
    return pub, sub, done, count


def _close(*clients) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


def raw_rate(url: str, messages: int, payload: int = 1024) -> float:
    """QoS-1 messages/s, one paho publisher → one paho subscriber (the broker's own round trip)."""
    pub, sub, done, count = _paho_pair(url, "bench/raw", messages)
    body = b"x" * payload
    t0 = time.perf_counter()
    for _ in range(messages):
        pub.publish("bench/raw", body, qos=1)
    done.wait(120)
    dt = time.perf_counter() - t0
    _close(pub, sub)
    return count[0] / dt


def raw_transfer(url: str, bundle: bytes, devices: int) -> float:
    """Seconds to move ``bundle`` in 128 KiB chunks to ``devices`` topics through the broker."""
    from sdk import protocol as proto

    chunks = [c.to_payload() for c in proto.split_bundle(bundle)]
    pub, sub, done, _ = _paho_pair(url, "bench/xfer/#", len(chunks) * devices)
    t0 = time.perf_counter()
    for d in range(devices):
        for c in chunks:
            pub.publish(f"bench/xfer/{d}", c, qos=1)
    done.wait(300)
    dt = time.perf_counter() - t0
    _close(pub, sub)
    return dt


_ROOT = Path(__file__).resolve().parents[1]

#: the receiving side in a process of its own, as devices are apart from the fleet (unless ``--together``)
_RAW_SUBSCRIBER = """
import sys, threading, time
import paho.mqtt.client as mqtt
port, expected = int(sys.argv[1]), int(sys.argv[2])
done, ready, n = threading.Event(), threading.Event(), [0]
def on_message(c, u, m):
    n[0] += 1
    if n[0] == expected:
        print(repr(time.time()), flush=True)
        done.set()
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
sub.on_message = on_message
sub.on_subscribe = lambda *a: ready.set()
sub.connect("127.0.0.1", port)
sub.subscribe("bench/xfer/#", qos=1)
sub.loop_start()
ready.wait(30)
print("ready", flush=True)
done.wait(300)
sub.disconnect()
sub.loop_stop()
"""
_SIMS = """
import sys
from fleet import SimulatedDevices
sims = SimulatedDevices(int(sys.argv[2]), sys.argv[1], models={"big": "0"}).start()
print("ready", flush=True)
sys.stdin.read()
print(sims.hashes.hits, flush=True)
sims.stop()
"""


def raw_transfer_apart(url: str, bundle: bytes, devices: int) -> float:
    """:func:`raw_transfer` with the subscriber in its own process (it reports when the last chunk came)."""
    import paho.mqtt.client as mqtt

    from sdk import protocol as proto

    chunks = [c.to_payload() for c in proto.split_bundle(bundle)]
    port = url.rsplit(":", 1)[1]
    child = subprocess.Popen([sys.executable, "-c", _RAW_SUBSCRIBER, port, str(len(chunks) * devices)],
                             stdout=subprocess.PIPE, text=True, cwd=_ROOT)
    try:
        assert child.stdout.readline().strip() == "ready"
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(100)
        pub.max_queued_messages_set(0)
        pub.connect("127.0.0.1", int(port))
        pub.loop_start()
        time.sleep(0.5)
        t0 = time.time()
        for d in range(devices):
            for c in chunks:
                pub.publish(f"bench/xfer/{d}", c, qos=1)
        end = float(child.stdout.readline())
        _close(pub)
        return end - t0
    finally:
        child.wait(30)


class _SimsApart:
    """:class:`fleet.SimulatedDevices` in a process of their own."""

    def __init__(self, url: str, devices: int) -> None:
        self.ids = [f"sim-{i:04d}" for i in range(devices)]
        self.proc = subprocess.Popen([sys.executable, "-c", _SIMS, url, str(devices)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=_ROOT)
        assert self.proc.stdout.readline().strip() == "ready"
        self.hits = "?"

    def stop(self) -> None:
        self.proc.stdin.close()
        self.hits = self.proc.stdout.readline().strip()
        self.proc.wait(30)


def digits_bundle(tmp: Path, key: Path, runs: int = 5):
    """The digits CNN trained here and converted to a signed full-int8 bundle (calibrated on 300
    training images); returns the bundle's path and the digits data."""
    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn

    digits = load_digits_split()
    model, _ = train_digits_cnn(digits)
    model.save(tmp / "digits.keras")
    np.savez(tmp / "calib.npz", x=digits.x_train[:300])
    bundle = convert(tmp / "digits.keras", target="cpu", quantize="int8", calibration=tmp / "calib.npz", key=key,
                     output=tmp / "digits.edgebundle", runs=runs).bundle_path
    return bundle, digits


def big_bundle(tmp: Path, key: Path, mib: float = 5.45) -> Path:
    """A real, signed bundle of about ``mib`` MiB: a dense model with random float32 weights."""
    import keras

    from converter import convert

    units = int(mib * 1024 * 1024 / 4 / 1024)
    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(units), keras.layers.Dense(10)])
    path = tmp / "big.keras"
    model.save(path)
    return convert(path, target="cpu", quantize="none", key=key, output=tmp / "big.edgebundle", runs=3).bundle_path


def rollout_vs_raw(url: str, tmp: Path, bundle: Path, devices: int, rounds: int,
                   apart: bool = True) -> list[tuple[str, str, str]]:
    """Part 4: ``rounds`` times, the raw broker transfer of the bundle's chunks to ``devices`` topics,
    then a rollout of the bundle to ``devices`` simulated devices; rows with the medians and ratio.
    ``apart``: the receiving side (the raw subscriber, the simulated devices) runs in its own process."""
    import statistics

    from fleet import Fleet, SimulatedDevices
    from sdk import protocol as proto

    data, size = bundle.read_bytes(), bundle.stat().st_size
    raws, pushes, notes = [], [], []
    for k in range(rounds):
        raw_s = (raw_transfer_apart if apart else raw_transfer)(url, data, devices)
        sims = _SimsApart(url, devices) if apart else SimulatedDevices(devices, url, models={"big": "0"}).start()
        try:
            with Fleet(tmp / f"fleet-push-{k}", url) as fleet:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len([d for d in fleet.devices() if d.online]) < devices:
                    time.sleep(0.05)
                t0 = time.time()  # the fleet's clock: the rollout's `finished` is on it
                rid = fleet.deploy(bundle, devices=sims.ids, canary=devices, max_per_minute=100_000)
                view = fleet.wait_rollout(rid, timeout=600)  # polls slowly: it shares the CPU being measured
                push_s = view.finished - t0  # from the deploy call to the fleet marking the rollout done
                stats = dict(fleet.stats)
        finally:
            sims.stop()
        raws.append(raw_s)
        pushes.append(push_s)
        notes.append(f"{push_s / raw_s:.2f} ({push_s:.2f} s / {raw_s:.2f} s; {view.counts['SUCCEEDED']}/{devices} "
                     f"SUCCEEDED, {stats.get('chunk_request', 0)} chunk requests, {stats.get('chunks_sent', 0)} chunks "
                     f"sent, sims' hash memo hits {sims.hits if apart else sims.hashes.hits})")
    raw_m, push_m = statistics.median(raws), statistics.median(pushes)
    ratio = statistics.median(p / r for p, r in zip(pushes, raws))
    mib = size / 2**20
    where = "; receivers in their own process" if apart else "; one process"
    return [
        (f"raw broker transfer, {mib:.1f} MiB x {devices} topics in 128 KiB chunks (median of {rounds}{where})",
         f"{raw_m:.2f} s", f"baseline; {devices * mib / raw_m:,.0f} MiB/s"),
        (f"rollout of the {mib:.1f} MiB bundle to {devices} simulated devices, window {proto.CHUNK_WINDOW} chunks "
         f"(median of {rounds})", f"{push_m:.2f} s", f"{ratio:.2f}x the raw transfer (median of the rounds' ratios)"),
        ("rounds: rollout / raw", "; ".join(notes), ""),
    ]


def job_rate(fleet, model: str, x: np.ndarray, batch: int, to=None) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fleet.run(model, x, batch_size=batch, to=to, timeout=600)
    return len(x) / (time.perf_counter() - t0), result


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk fleet benchmark")
    ap.add_argument("--sims", type=int, default=4)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--raw-messages", type=int, default=20_000)
    ap.add_argument("--agent-samples", type=int, default=18_000)
    ap.add_argument("--only", choices=("rollout",), help="run only part 4 (the rollout against the raw transfer)")
    ap.add_argument("--rounds", type=int, default=3, help="part 4: (raw, rollout) pairs to take the median of")
    ap.add_argument("--devices", type=int, default=50, help="part 4: simulated devices")
    ap.add_argument("--bundle", type=Path, help="part 4: a signed bundle to push (default: a 5.45 MiB one built here)")
    ap.add_argument("--together", action="store_true", help="part 4: the raw subscriber and the simulated devices in "
                    "this process (sharing the fleet's GIL and CPU), not each in a process of their own")
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        print("mosquitto is not installed: apt-get install -y mosquitto", file=sys.stderr)
        return 2

    from agent import Agent
    from agent.config import load_config
    from fleet import Fleet, SimulatedDevices
    from fleet.broker import EmbeddedBroker
    from sdk.signing import generate_keys

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        broker = EmbeddedBroker("mosquitto").start()
        url = broker.url
        procs: list[subprocess.Popen] = []
        try:
            if args.only == "rollout":
                private, _ = generate_keys(tmp / "keys")
                rows += rollout_vs_raw(url, tmp, args.bundle or big_bundle(tmp, private), args.devices, args.rounds,
                                       not args.together)
                return _print(rows)
            # 1. the baseline
            raw = raw_rate(url, args.raw_messages)
            rows.append(("broker raw QoS-1 rate, paho → paho, 1 KiB", f"{raw:,.0f} msg/s", "baseline"))

            # 2. the fleet, no-op model
            sims = SimulatedDevices(args.sims, url, models={"noop": "1"}, capacity=2, infer_s=0.0).start()
            x = np.random.default_rng(0).random((args.samples, 8, 8, 1), dtype=np.float32)
            with Fleet(tmp / "fleet-noop", url) as fleet:
                time.sleep(1.0)
                rate, res = job_rate(fleet, "noop", x, args.batch_size)
            sims.stop()
            rows.append((f"fleet, no-op model, {args.sims} simulated devices, batch {args.batch_size}",
                         f"{rate:,.0f} samples/s", f"{rate / raw:.1f}x the raw message rate; "
                         f"{res.tasks / res.elapsed_s:,.0f} tasks/s, retries {res.retries}"))

            # 3. real agents, 1 vs 2
            private, public = generate_keys(tmp / "keys")
            bundle, digits = digits_bundle(tmp, private)
            for name in ("agent-a", "agent-b"):
                cfg = load_config(None, env={}, device_id=name, broker_url=url, state_dir=tmp / name,
                                  trusted_keys=[str(public)], threads=1, pool_size=1, tags={"name": name})
                (tmp / f"{name}.toml").write_text(cfg.to_toml())
                setup = Agent(cfg)
                setup.install(bundle)
                setup.stop()
                procs.append(subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--config",
                                               str(tmp / f"{name}.toml")], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            reps = max(1, args.agent_samples // len(digits.x_test))
            xa = np.concatenate([digits.x_test] * reps)
            with Fleet(tmp / "fleet-agents", url) as fleet:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len([d for d in fleet.devices() if d.online and d.models]) < 2:
                    time.sleep(0.2)
                fleet.run("digits", xa[:2000], batch_size=100)  # warm-up
                ta, _ = job_rate(fleet, "digits", xa, 100, to={"name": "agent-a"})
                tb, _ = job_rate(fleet, "digits", xa, 100, to={"name": "agent-b"})
                tab, res = job_rate(fleet, "digits", xa, 100)
            e = tab / (ta + tb)
            rows.append((f"real agent A alone, digits int8, {len(xa):,} samples, batch 100", f"{ta:,.0f} samples/s", ""))
            rows.append(("real agent B alone", f"{tb:,.0f} samples/s", ""))
            shares = ", ".join(f"{d} {100 * v['share']:.0f} %" for d, v in res.devices.items())
            rows.append(("real agents A + B", f"{tab:,.0f} samples/s",
                         f"E = {e:.2f} (T(A+B) / (T(A) + T(B))); shares {shares}; summary's estimate "
                         f"{res.efficiency:.2f}"))
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
            procs.clear()

            # 4. a 5 MiB bundle to 50 simulated devices
            rows += rollout_vs_raw(url, tmp, args.bundle or big_bundle(tmp, private), args.devices, args.rounds,
                                   not args.together)
        finally:
            for p in procs:
                p.kill()
            broker.stop()
    return _print(rows)


def _print(rows: list[tuple[str, str, str]]) -> int:
    print(f"# edgesdk fleet_bench — Mosquitto on loopback, {os.cpu_count()} cores\n")
    print("| measurement | result | compared with the baseline |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
