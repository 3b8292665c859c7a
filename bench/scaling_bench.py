"""How a job's throughput scales with the number of devices, against N x one device, in one run.

Every device is a simulated board (:class:`fleet.SimulatedDevices` in a process of its own,
``edgesdk fleet simulate``: the real protocol over a Mosquitto started here) with a fixed per-sample time (``--per-sample-ms``, 2 ms by default) and
one slot: it runs one task at a time, as one board does (holding ``--prefetch`` more queued, as an
agent does), so N of them stand for N separate
boards and the ideal job rate with N devices is N x the rate of one. The fleet is the real
:class:`fleet.Fleet` (SQLite, its engine thread, prefetch), in this process.

1. The baseline: the same job on one device, T(1) samples/s.
2. N = 1, 4, 16, 64 (``--devices``): T(N) against N x T(1), the scaling efficiency.
3. The fleet's own ceiling: the same job on ``max(--devices)`` devices with zero per-sample time,
   so the devices cost nothing and what is left is the fleet (its database writes, one task and
   one result through the broker per task); the CPU each process used says which one binds: the highest samples/s any
   number of devices can reach at this batch size. Efficiency is reported against
   min(N x T(1), ceiling) too, and the table says which one binds.

Rates are the job summary's (first dispatch to last result), so the job's set-up (copying the
inputs into the fleet's state) is not counted; the wall time of ``Fleet.run`` is printed beside.

    python bench/scaling_bench.py [--devices 1,4,16,64] [--per-sample-ms 2] [--batch-size 16]
                                  [--seconds 4] [--prefetch 4] [--chart scaling.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_boards(url: str, devices: int, per_sample_s: float, prefix: str, prefetch: int) -> subprocess.Popen:
    """``devices`` simulated boards in their own process (``edgesdk fleet simulate``), so they do
    not share the fleet's interpreter lock: like boards, they cost the fleet nothing but messages."""
    return subprocess.Popen([sys.executable, "-m", "edgesdk", "fleet", "--broker", url, "simulate", str(devices),
                             "--model", "board=1", "--infer-ms", f"{per_sample_s * 1000:g}", "--capacity", "1",
                             "--prefetch", str(prefetch), "--prefix", prefix], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_job(url: str, state: Path, devices: int, per_sample_s: float, samples: int, batch: int,
            broker_pid: int, prefetch: int) -> dict:
    """One job of ``samples`` samples over ``devices`` simulated boards: its rates, and the CPU
    seconds the fleet, the boards and the broker spent on it."""
    from fleet import Fleet

    x = np.random.default_rng(devices).random((samples, 8, 8, 1), dtype=np.float32)
    boards = start_boards(url, devices, per_sample_s, f"b{devices}x{int(per_sample_s * 1e6)}", prefetch)
    try:
        with Fleet(state, url) as fleet:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sum(1 for d in fleet.devices() if d.online) < devices:
                time.sleep(0.1)
            cpu0 = (time.process_time(), _cpu_s(boards.pid), _cpu_s(broker_pid))
            t0 = time.perf_counter()
            res = fleet.run("board", x, batch_size=batch, timeout=900)
            wall = time.perf_counter() - t0
            cpu = [b - a for a, b in zip(cpu0, (time.process_time(), _cpu_s(boards.pid), _cpu_s(broker_pid)))]
    finally:
        boards.send_signal(signal.SIGTERM)
        boards.wait(30)
    assert len(res.outputs[0]) == samples
    busy = [d["busy_s"] for d in res.devices.values()]
    return {"devices": devices, "rate": res.samples_per_s, "wall_s": wall, "wall": samples / wall,
            "retries": res.retries, "used": len(res.devices), "busy_min": min(busy), "busy_max": max(busy),
            "cpu": dict(zip(("fleet", "boards", "broker"), cpu))}


def chart(rows: list[dict], single: float, ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["devices"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [n * single for n in ns], "--", color="grey", label="N x one device")
    ax.axhline(ceiling, color="tab:red", linestyle=":", label=f"fleet ceiling ({ceiling:,.0f}/s)")
    ax.plot(ns, [r["rate"] for r in rows], "o-", color="tab:blue", label="measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("devices (simulated boards)")
    ax.set_ylabel("job samples/s")
    ax.set_title("edgesdk: job throughput against devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk scaling benchmark")
    ap.add_argument("--devices", default="1,4,16,64", help="comma-separated device counts")
    ap.add_argument("--per-sample-ms", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prefetch", type=int, default=4, help="tasks each board holds queued (the agent's default)")
    ap.add_argument("--seconds", type=float, default=4.0, help="ideal length of each job")
    ap.add_argument("--chart", type=Path, default=None, help="write a PNG of the curve here")
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        print("mosquitto is not installed: apt-get install -y mosquitto", file=sys.stderr)
        return 2
    counts = sorted({int(n) for n in args.devices.split(",")})
    per_sample = args.per_sample_ms / 1000.0

    from fleet.broker import EmbeddedBroker

    def samples_for(n: int) -> int:  # every job ideally lasts --seconds, whole tasks on every device
        per_device = max(1, int(args.seconds / per_sample) // args.batch_size) * args.batch_size
        return n * per_device

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        broker = EmbeddedBroker("mosquitto").start()
        try:
            for n in counts:
                rows.append(run_job(broker.url, tmp / f"fleet-{n}", n, per_sample, samples_for(n), args.batch_size,
                                    broker.pid, args.prefetch))
            top = max(counts)
            ceiling_run = run_job(broker.url, tmp / "fleet-ceiling", top, 0.0, samples_for(top), args.batch_size,
                                  broker.pid, args.prefetch)
        finally:
            broker.stop()

    single = next(r["rate"] for r in rows if r["devices"] == 1) if 1 in counts else 1.0 / per_sample
    ceiling = ceiling_run["rate"]
    print(f"# edgesdk scaling_bench: simulated boards of {args.per_sample_ms:g} ms/sample, one slot each, "
          f"batch {args.batch_size}, prefetch {args.prefetch}, Mosquitto on loopback, {os.cpu_count()} cores\n")
    print(f"baseline: one device, T(1) = {single:,.0f} samples/s (its ideal: {1 / per_sample:,.0f}/s)")
    print(f"fleet ceiling: {ceiling:,.0f} samples/s ({ceiling / args.batch_size:,.0f} tasks/s) with {top} devices of "
          "0 ms/sample: the fleet's own work per task")
    c, w = ceiling_run["cpu"], ceiling_run["wall_s"]
    busiest = max(c, key=c.get)
    print(f"where it comes from: over that run's {w:.1f} s the fleet process used {c['fleet'] / w:.2f} cores (its "
          f"engine is one Python thread: about 1.0 is its limit), the boards' process {c['boards'] / w:.2f}, the "
          f"broker {c['broker'] / w:.2f}, of {os.cpu_count()} cores; the busiest is the {busiest}\n")
    print("| devices N | job samples/s | N x T(1) | T(N) / (N x T(1)) | min(N x T(1), ceiling) | T(N) / that "
          "| binds | wall samples/s | devices used | busy s (min-max) | CPU cores: fleet / boards / broker |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def cores(r: dict) -> str:
        return " / ".join(f"{v / r['wall_s']:.2f}" for v in r["cpu"].values())

    for r in rows:
        ideal = r["devices"] * single
        bound = min(ideal, ceiling)
        print(f"| {r['devices']} | {r['rate']:,.0f} | {ideal:,.0f} | {r['rate'] / ideal:.2f} | {bound:,.0f} | "
              f"{r['rate'] / bound:.2f} | {'devices' if ideal <= ceiling else 'fleet'} | {r['wall']:,.0f} | "
              f"{r['used']}/{r['devices']} | {r['busy_min']:.1f}-{r['busy_max']:.1f} | "
              f"{cores(r)} |")
    if args.chart:
        chart(rows, single, ceiling, args.chart)
        print(f"\nchart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
