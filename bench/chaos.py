"""Faults, in figures: a batch job over real agents while the broker, an agent and the leading
controller are SIGKILLed; results lost, results duplicated, outputs against local inference, and
the time to finish against an undisturbed run of the same job.

Everything is a real process on this machine: a Mosquitto with persistence (its store saved
every second, so a SIGKILL loses what came since), three ``edgesdk agent run`` processes with the
digits CNN, and two ``edgesdk fleet serve`` controllers on one fleet database (PostgreSQL when
one answers, else SQLite): one leads, the other stands by. This process submits the job and reads
its progress through the fleet's Python API, as ``edgesdk fleet run`` would.

1. The undisturbed run: the job on the three agents, no faults; its wall time is the baseline.
2. The same job again; as it progresses, at fixed fractions of its tasks, the broker is
   SIGKILLed and restarted ``--broker-kills`` times (5), one agent is SIGKILLed (and stays
   dead), and the leading controller is SIGKILLed (the standby takes over with the next lease).
3. Checked: every task DONE exactly once (no task lost; the fleet took one result per task, so
   none duplicated in the output), every output equal to the bundle run here one sample at a
   time, and the results the agents sent twice that the fleet dropped (``late``/``duplicate``).

    python bench/chaos.py [--samples 10000] [--batch 5] [--broker-kills 5] [--broker nats] [--short] [--json out.json]

``--broker nats``: the same on a 3-node NATS cluster (MQTT 3.1.1, JetStream with 3 replicas), the
controllers on node 0 first, the agents on nodes 1 and 2 first; each broker fault SIGKILLs the
next node in turn and starts it again, so every client loses its node at least once.

``--short`` (what CI runs, from ``tests/test_chaos.py``): 3,000 samples and 2 broker kills.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Mosquitto with persistence, on a fixed port so clients reconnect to it after a restart."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                             f"persistence true\npersistence_location {root}/\nautosave_interval 1\n"
                             f"max_queued_messages 100000\nlog_dest file {root / 'mosquitto.log'}\n")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def url_for(self, client: int) -> str:
        """Every client's URL: one node."""
        return self.url

    def fault(self, k: int, down_s: float) -> str:
        """The ``k``-th broker fault: SIGKILL, ``down_s`` dead, start again (from its store)."""
        self.kill()
        time.sleep(down_s)
        self.start()
        return "broker SIGKILLed and restarted"

    def stop(self) -> None:
        self.kill()


class Cluster:
    """A 3-node NATS cluster with MQTT and JetStream (the tests' own, ``tests/servers.py``): the
    controllers list node 0 first, the agents nodes 1 and 2; each broker fault SIGKILLs the next
    node in turn, so every client's first node dies at some point, and starts it again."""

    def __init__(self, root: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from servers import NatsCluster

        root.mkdir(parents=True, exist_ok=True)
        self.nodes = NatsCluster(root)

    @property
    def url(self) -> str:
        return self.nodes.url(0, 1, 2)

    def url_for(self, client: int) -> str:
        return self.nodes.url(*((1, 2, 0), (2, 1, 0))[client % 2])

    def start(self) -> None:
        self.nodes.start()

    def fault(self, k: int, down_s: float) -> str:
        node = k % 3
        self.nodes.kill(node)
        time.sleep(down_s)
        self.nodes.restart(node)
        return f"NATS node {node} SIGKILLed and restarted"

    def stop(self) -> None:
        self.nodes.stop()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgesdk", *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _database(pg: str) -> Optional[str]:
    """A fresh PostgreSQL database when one answers at ``pg``, else None (SQLite)."""
    try:
        import psycopg

        with psycopg.connect(pg, autocommit=True, connect_timeout=3) as conn:
            name = "edgesdk_chaos_" + uuid.uuid4().hex[:8]
            conn.execute(f"CREATE DATABASE {name}")
        return pg.rsplit("/", 1)[0] + "/" + name
    except Exception:  # no PostgreSQL here: the controllers share a SQLite state directory
        return None


def _drop(pg: str, db: Optional[str]) -> None:
    if db is None:
        return
    import psycopg

    from fleet.storage import close_storage

    close_storage(db)
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db.rsplit('/', 1)[1]} WITH (FORCE)")


def _bundle(tmp: Path) -> tuple[Path, Path, Any]:
    """The digits CNN, trained and converted here (int8, signed): (bundle, public key, test data)."""
    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from sdk.signing import generate_keys

    private, public = generate_keys(tmp / "keys")
    data = load_digits_split()
    model, _ = train_digits_cnn(data, epochs=3)
    model.save(tmp / "digits.keras")
    np.savez(tmp / "calib.npz", x=data.x_train[:300])
    res = convert(tmp / "digits.keras", target="cpu", quantize="int8", calibration=tmp / "calib.npz",
                  key=private, output=tmp / "digits.edgebundle", runs=3)
    return res.bundle_path, public, data


def local_predictions(bundle: Path, x: np.ndarray) -> np.ndarray:
    """The bundle run here one sample at a time, as the agents must answer."""
    from sdk.bundle import Bundle
    from sdk.runtime import open_engine

    engine = open_engine(Bundle.open(bundle).model_bytes(), "cpu")
    return np.concatenate([engine.run_float([s[None].astype(np.float32)])[0] for s in x])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agent import Agent
    from agent.config import load_config
    from fleet import Fleet

    tmp = Path(tempfile.mkdtemp(prefix="edgesdk-chaos-"))
    bundle, public, data = _bundle(tmp)
    x = np.concatenate([data.x_test] * (args.samples // len(data.x_test) + 1))[: args.samples]
    expected = np.concatenate([local_predictions(bundle, data.x_test)] * (args.samples // len(data.x_test) + 1))
    expected = expected[: args.samples]
    broker = Cluster(tmp / "nats") if args.broker == "nats" else Broker(tmp / "broker")
    broker.start()
    db = _database(args.pg)
    procs: list[subprocess.Popen] = []
    fleet_args = ["fleet", "--broker", broker.url, "--state", str(tmp / "fleet")] + (["--db", db] if db else [])
    try:
        agents = []
        for i in range(3):
            cfg = load_config(None, env={}, device_id=f"chaos-{i}", broker_url=broker.url_for(i),
                              state_dir=tmp / f"chaos-{i}", trusted_keys=[str(public)], threads=1, pool_size=1)
            (tmp / f"chaos-{i}.toml").write_text(cfg.to_toml())
            setup = Agent(cfg)
            setup.install(bundle)
            setup.stop()
            agents.append(_spawn(["agent", "run", "--config", str(tmp / f"chaos-{i}.toml")], tmp / f"chaos-{i}.log"))
        procs += agents
        controllers = {}
        for name in ("a", "b"):
            controllers[name] = _spawn([*fleet_args, "serve", "--lease", str(args.lease)], tmp / f"controller-{name}.log")
            procs.append(controllers[name])
            time.sleep(2.0)  # a leads, b stands by
        fleet = Fleet(tmp / "fleet", broker.url, db=db)
        deadline = time.monotonic() + 60
        while sum(1 for d in fleet.devices() if d.online) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agents did not come online: see {tmp}")
            time.sleep(0.2)

        def one_job(faults: list[tuple[float, str]]) -> tuple[float, Any, list[str]]:
            job = fleet.submit("digits", x, batch_size=args.batch, lease_s=args.task_lease)
            total = fleet.job(job).tasks
            done_log: list[str] = []
            t0 = time.perf_counter()
            pending = sorted(faults)
            while True:
                s = fleet.job(job)
                if s.done:
                    break
                while pending and s.counts["DONE"] >= pending[0][0] * total:
                    _, fault = pending.pop(0)
                    at = f"{time.perf_counter() - t0:6.1f} s  {s.counts['DONE']:>5}/{total} tasks  "
                    done_log.append(at + inject(fault))
                time.sleep(0.05)
            return time.perf_counter() - t0, fleet.finish_job(job, timeout=600), done_log

        broker_faults = iter(range(args.broker_kills))

        def inject(fault: str) -> str:
            if fault == "broker":
                return broker.fault(next(broker_faults), args.broker_down)
            if fault == "agent":
                agents[0].send_signal(signal.SIGKILL)
                return "agent chaos-0 SIGKILLed"
            leader = next(n for n, p in controllers.items() if p.poll() is None and _leads(tmp, n))
            controllers[leader].send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            standby = next(n for n in controllers if n != leader)
            while not _leads(tmp, standby) and time.perf_counter() - killed < 120:
                time.sleep(0.05)
            takeover.append(time.perf_counter() - killed)  # the standby leads (its log says so)
            return f"leading controller {leader} SIGKILLed; {standby} leads {takeover[-1]:.1f} s later"

        takeover: list[float] = []
        quiet_s, quiet, _ = one_job([])
        kills = [((k + 1) / (args.broker_kills + 3), "broker") for k in range(args.broker_kills)]
        faults = kills + [((args.broker_kills + 1) / (args.broker_kills + 3) - 0.05, "agent"),
                          ((args.broker_kills + 2) / (args.broker_kills + 3) - 0.05, "controller")]
        chaos_s, result, timeline = one_job(faults)
        outputs = result.outputs[0]
        return {
            "samples": args.samples, "tasks": result.tasks, "backend": "postgresql" if db else "sqlite",
            "broker": "3-node NATS cluster" if args.broker == "nats" else "Mosquitto with persistence",
            "quiet_s": quiet_s, "chaos_s": chaos_s, "slowdown": chaos_s / quiet_s,
            "tasks_done": result.counts["DONE"], "tasks_lost": result.tasks - result.counts["DONE"],
            "results": int(outputs.shape[0]),
            "duplicated": int(outputs.shape[0]) - args.samples,
            "identical_to_local": bool(np.array_equal(outputs, expected)),
            "quiet_identical": bool(np.array_equal(quiet.outputs[0], expected)),
            "retries": result.retries, "timeline": timeline, "files": str(tmp),
            "takeover_s": takeover[0] if takeover else None, "lease_s": args.lease,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        _drop(args.pg, db)


def _leads(tmp: Path, name: str) -> bool:
    log = (tmp / f"controller-{name}.log").read_text(errors="replace")
    return log.rfind("fleet controller: leading") > log.rfind("fleet controller: standing by")


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk chaos benchmark")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--broker-kills", type=int, default=5)
    ap.add_argument("--broker-down", type=float, default=1.0, help="seconds the broker stays dead each time")
    ap.add_argument("--lease", type=float, default=3.0, help="the controllers' lease (s)")
    ap.add_argument("--task-lease", type=float, default=10.0, help="the job's task lease (s)")
    ap.add_argument("--broker", choices=["mosquitto", "nats"], default="mosquitto",
                    help="one Mosquitto with persistence, or a 3-node NATS cluster whose nodes die in turn")
    ap.add_argument("--short", action="store_true", help="3,000 samples, 2 broker kills (CI)")
    ap.add_argument("--pg", default=os.environ.get("EDGESDK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.short:
        args.samples, args.broker_kills = 3000, 2
    r = run(args)
    print(f"edgesdk chaos bench: {r['samples']:,} samples in {r['tasks']} tasks over 3 agents, fleet on {r['backend']}, "
          f"broker: {r['broker']}")
    for line in r["timeline"]:
        print("  " + line)
    print()
    print("| measurement | result |")
    print("|---|---|")
    print(f"| undisturbed run (baseline) | {r['quiet_s']:.1f} s |")
    what = "NATS node SIGKILLs" if args.broker == "nats" else "broker SIGKILLs"
    print(f"| with {args.broker_kills} {what}, 1 agent SIGKILL, the leader SIGKILLed | {r['chaos_s']:.1f} s "
          f"= {r['slowdown']:.2f}x the baseline |")
    print(f"| the standby leads after the leader's SIGKILL | {r['takeover_s']:.1f} s (lease {r['lease_s']:g} s) |")
    print(f"| results lost | {r['tasks_lost']} tasks, {r['samples'] - r['results'] + max(0, r['duplicated'])} samples |")
    print(f"| results duplicated | {max(0, r['duplicated'])} |")
    print(f"| outputs identical to local inference | {r['identical_to_local']} |")
    print(f"| re-dispatches | {r['retries']} |")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    ok = r["tasks_lost"] == 0 and r["duplicated"] == 0 and r["identical_to_local"] and r["quiet_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
