"""10,000 devices on one controller: registration, a staged rollout, a job, on both backends.

Everything runs as an operator runs it, each in its own process on this machine: a Mosquitto with
its default settings (no queue tuning), the controller (``edgesdk fleet serve``, whose CPU
seconds and peak RSS are read from /proc), and the simulated devices (``edgesdk fleet
simulate``: the real protocol, many devices per MQTT connection, fake inference). This process
only drives the fleet through its Python API (deploy, run) as ``edgesdk fleet`` commands do.

1. The broker's own figures as the baseline: QoS-1 1 KiB messages/s paho → paho, and the raw
   transfer rate of 128 KiB messages (what a rollout's chunks are).
2. Registration: the devices start; time until the fleet lists them all online.
3. A staged rollout of a ``--bundle-mib`` bundle to all of them (100 canaries, then 25 % stages,
   no rate limit): wall time, and its bytes per second against the raw transfer rate.
4. A job of ``--samples`` samples in tasks of ``--batch`` across them: tasks/s, samples/s; beside
   it, the same controller's job over 4 devices (run before the others arrive): if dispatch
   cost grew with the fleet, the tasks/s of the large job would fall below the small one's.

For each step: wall time, the controller's CPU seconds and peak RSS (VmHWM: the highest so far),
and the messages per second the controller received and sent (its ``/metrics``).

    python bench/scale.py [--devices 10000] [--backend both|sqlite|postgresql] [--samples 40000]
                          [--batch 4] [--bundle-mib 1] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleet_bench import big_bundle, raw_rate, raw_transfer  # noqa: E402
from bench.scaling_bench import _cpu_s  # noqa: E402


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _messages(http: str) -> tuple[float, float]:
    """(received, sent) message counts from the controller's /metrics."""
    text = urllib.request.urlopen(f"http://{http}/metrics", timeout=30).read().decode()
    received = sent = 0.0
    for line in text.splitlines():
        if line.startswith("edgesdk_fleet_messages_received_total"):
            received += float(line.rsplit(" ", 1)[1])
        elif line.startswith("edgesdk_fleet_messages_sent_total"):
            sent += float(line.rsplit(" ", 1)[1])
    return received, sent


class Controller:
    """``edgesdk fleet serve`` in its own process, with its HTTP API on loopback (for /metrics)."""

    def __init__(self, url: str, state: Path, db: Optional[str], log: Path) -> None:
        from fleet.broker import free_port

        self.http = f"127.0.0.1:{free_port()}"
        args = [sys.executable, "-m", "edgesdk", "fleet", "--broker", url, "--state", str(state)]
        args += ["--db", db] if db else []
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([*args, "serve", "--http", self.http], stdout=self.log, stderr=subprocess.STDOUT)

    def figures(self) -> dict[str, float]:
        received, sent = _messages(self.http)
        return {"cpu_s": _cpu_s(self.proc.pid), "rss_mb": _peak_rss_mb(self.proc.pid), "received": received,
                "sent": sent}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


def step(name: str, controller: Controller, run: Callable[[], Any]) -> dict[str, Any]:
    before = controller.figures()
    t0 = time.perf_counter()
    detail = run()
    wall = time.perf_counter() - t0
    after = controller.figures()
    row = {"step": name, "wall_s": wall, "cpu_s": after["cpu_s"] - before["cpu_s"], "peak_rss_mb": after["rss_mb"],
           "in_per_s": (after["received"] - before["received"]) / wall,
           "out_per_s": (after["sent"] - before["sent"]) / wall}
    row.update(detail or {})
    print(f"  {name}: {wall:.1f} s, controller {row['cpu_s']:.1f} CPU s, peak RSS {row['peak_rss_mb']:.0f} MB, "
          f"{row['in_per_s']:,.0f} msg/s in, {row['out_per_s']:,.0f} msg/s out", flush=True)
    return row


def _end(proc: subprocess.Popen) -> None:
    """Stop simulated devices for good before the next backend's steps: devices left running
    would go on talking to the same broker, and the next controller would serve them too."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def run_backend(backend: str, url: str, tmp: Path, args: argparse.Namespace, bundle: Path) -> list[dict[str, Any]]:
    from fleet import Fleet

    db = None
    if backend == "postgresql":
        import psycopg

        name = "edgesdk_scale_" + uuid.uuid4().hex[:8]
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        db = args.pg.rsplit("/", 1)[0] + "/" + name
    state = tmp / backend
    controller = Controller(url, state, db, tmp / f"controller-{backend}.log")
    sims = None
    rows = []
    try:
        fleet = Fleet(state, url, db=db)
        deadline = time.monotonic() + 60
        while not fleet.controller_elsewhere():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not start: see {tmp}/controller-{backend}.log")
            time.sleep(0.2)
        time.sleep(2)  # its HTTP server

        def simulate(count: int, prefix: str, group: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "edgesdk", "fleet", "--broker", url, "simulate", str(count),
                                     "--model", "noop=1", "--infer-ms", "0", "--prefetch", "1", "--prefix", prefix,
                                     "--tag", f"group={group}"],
                                    stdout=subprocess.DEVNULL, stderr=open(tmp / f"sims-{backend}.log", "ab"))

        def online() -> int:
            return sum(1 for d in fleet.devices() if d.online)

        def register() -> dict[str, Any]:
            nonlocal sims
            sims = simulate(args.devices, "sim", "all")
            while online() < args.devices + 4:
                if sims.poll() is not None:
                    raise RuntimeError(f"the simulated devices exited: see {tmp}/sims-{backend}.log")
                time.sleep(1.0)
            return {"devices": args.devices}

        def job_on(group: str, samples: int) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                x = np.random.default_rng(1).random((samples, 16), dtype=np.float32)
                result = fleet.run("noop", x, batch_size=args.batch, to={"group": group}, timeout=3600)
                np.testing.assert_array_equal(result.outputs[0], x[:, :4])  # every sample answered, in order
                return {"tasks": result.tasks, "samples_per_s": result.samples_per_s, "retries": result.retries,
                        "devices_used": len(result.devices)}
            return run

        def rollout() -> dict[str, Any]:
            rid = fleet.deploy(bundle, to={"sim": "1"}, canary=100, batch_percent=25, max_per_minute=10 ** 6,
                               timeout=3600)
            view = fleet.wait_rollout(rid, poll=1.0)
            size = bundle.stat().st_size
            return {"state": view.state, "succeeded": view.counts["SUCCEEDED"], "bytes": size * (args.devices + 4)}

        few = simulate(4, "few", "few")
        try:
            while online() < 4:
                time.sleep(0.5)
            # the same controller's dispatch with 4 devices, before the 10,000 arrive: the baseline of its cost
            rows.append(step("job on 4 devices", controller, job_on("few", min(args.samples, 8000))))
            rows.append(step("registration", controller, register))
            rows.append(step("rollout", controller, rollout))
            rows.append(step(f"job on {args.devices:,} devices", controller, job_on("all", args.samples)))
        finally:
            _end(few)
        for r in rows:
            r["backend"] = backend
    finally:
        if sims is not None:
            _end(sims)
        controller.stop()
        if db:
            import psycopg

            from fleet.storage import close_storage

            close_storage(db)
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {db.rsplit('/', 1)[1]} WITH (FORCE)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk scale benchmark: one controller, many devices")
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--backend", choices=["both", "sqlite", "postgresql"], default="both")
    ap.add_argument("--samples", type=int, default=40000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bundle-mib", type=float, default=1.0)
    ap.add_argument("--pg", default=os.environ.get("EDGESDK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from fleet.broker import EmbeddedBroker
    from sdk.signing import generate_keys

    tmp = Path(tempfile.mkdtemp(prefix="edgesdk-scale-"))
    private, _ = generate_keys(tmp / "keys")
    bundle = big_bundle(tmp, private, mib=args.bundle_mib)
    print(f"edgesdk scale bench: {args.devices:,} simulated devices, Mosquitto with default settings, "
          f"{os.cpu_count()} cores; files in {tmp}", flush=True)
    # the baseline on a broker whose queues never drop (a publisher faster than its subscriber
    # would lose messages past Mosquitto's default queue of 1,000 and time the loss, not the broker)
    with EmbeddedBroker("mosquitto") as raw:
        rate = raw_rate(raw.url, 20000)
        chunk_rate = bundle.stat().st_size * 200 / raw_transfer(raw.url, bundle.read_bytes(), 200)  # bytes/s
    with EmbeddedBroker("mosquitto", defaults=True) as broker:
        url = broker.url
        print(f"  raw broker: {rate:,.0f} msg/s (QoS 1, 1 KiB), {chunk_rate / 2 ** 20:,.0f} MiB/s (128 KiB chunks)",
              flush=True)
        rows: list[dict[str, Any]] = []
        for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
            print(f"backend {backend}:", flush=True)
            rows += run_backend(backend, url, tmp, args, bundle)
    print()
    print("| backend | step | wall s | controller CPU s | controller peak RSS MB | msg/s in | msg/s out | "
          "against the raw broker |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["step"] == "rollout":
            versus = f"{r['bytes'] / r['wall_s'] / 2 ** 20:,.0f} MiB/s = {r['bytes'] / r['wall_s'] / chunk_rate:.2f} of raw"
        elif r["step"].startswith("job"):
            versus = f"{r['tasks'] / r['wall_s']:,.0f} tasks/s = {(r['tasks'] * 2 / r['wall_s']) / rate:.2f} of raw msg/s"
        else:
            versus = f"{r['devices'] / r['wall_s']:,.0f} devices/s online"
        print(f"| {r['backend']} | {r['step']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['in_per_s']:,.0f} | {r['out_per_s']:,.0f} | {versus} |")
    if args.json:
        args.json.write_text(json.dumps({"raw_msg_per_s": rate, "raw_bytes_per_s": chunk_rate, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
