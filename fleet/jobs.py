"""Distributed batch inference: split a dataset into tasks, let devices pull them, collect every
result exactly once, write the results in input order.

* A job's inputs are copied into the fleet's state (``jobs/<id>/x<i>.npy``) and cut into tasks
  of ``batch_size`` samples; every task is a row in the fleet database (PENDING → LEASED → DONE,
  or FAILED after ``max_attempts`` dispatches).
* Dispatch is pull-based: agents announce ``capacity`` and ``free`` slots for the models they
  run (:class:`~sdk.protocol.WorkRequest`); the fleet keeps at most ``capacity`` of a device's
  tasks outstanding and sends none while it announces 0 free, so a fast device returns results
  sooner and gets more work, and a slow or busy one is never flooded. (MQTT shared subscriptions
  deliver round-robin, blind to load, and lose a dead member's unacknowledged messages.)
* Every dispatch holds a lease of ``lease_s``; a task whose lease ends, or whose device goes
  offline (its Last-Will), goes back to PENDING and is dispatched again; a device that let a
  lease lapse gets no more tasks until it announces free slots again (a hung agent does not).
* Results are stored in the database as they arrive (before the agent's outbox entry is
  acknowledged), de-duplicated by task id: the first result of a task wins, a late duplicate
  from a device whose lease had ended is acknowledged and dropped.
* A fleet process killed mid-job resumes from the database without redoing finished tasks.

The summary reports samples/s, each device's share and throughput (samples per second of its
own busy time: the union of its tasks' run times, so parallel slots count once), retries, and
the efficiency E = job samples/s ÷ Σ per-device throughput: the fraction of the devices'
combined compute rate that the distribution delivered end to end. (``bench/fleet_bench.py``
measures E as the issue defines it, against single-device runs of the same job.)
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sdk import protocol as proto
from sdk.errors import JobError, NotFoundError

from .registry import Registry, matches
from .state import FleetDB, dumps, loads

__all__ = ["JobOptions", "JobSummary", "JobController", "create_job", "summary", "write_results"]

FORMATS = ("npz", "jsonl")
_HEADER_ALLOWANCE = 1024  # a task frame's JSON header and MQTT overhead


@dataclass
class JobOptions:
    batch_size: int = 64
    lease_s: float = 60.0
    max_attempts: int = 5
    selector: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise JobError("--batch-size must be at least 1")
        if self.lease_s <= 0:
            raise JobError("--lease must be positive (seconds)")
        if self.max_attempts < 1:
            raise JobError("max_attempts must be at least 1")


@dataclass
class JobSummary:
    id: str
    model: str
    state: str
    reason: str
    samples: int
    tasks: int
    counts: dict[str, int]
    samples_done: int
    elapsed_s: Optional[float]
    samples_per_s: Optional[float]
    retries: int
    devices: dict[str, dict[str, float]]
    efficiency: Optional[float]
    output: Optional[str]
    outputs: Optional[list[np.ndarray]] = None  # filled by Fleet.run

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELED")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        return d


def create_job(db: FleetDB, model: str, inputs: Sequence[np.ndarray], options: JobOptions, *, now: float,
               output: Optional[str] = None, fmt: str = "npz", max_packet: int = 256 * 1024) -> str:
    """Store the inputs and the task rows of a new job (state RUNNING)."""
    options.validate()
    if fmt not in FORMATS:
        raise JobError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    arrays = [np.ascontiguousarray(x) for x in inputs]
    if not arrays or arrays[0].ndim < 1 or arrays[0].shape[0] == 0:
        raise JobError("the job's input data holds no samples")
    n = int(arrays[0].shape[0])
    if any(a.shape[0] != n for a in arrays):
        raise JobError("the job's inputs have different sample counts")
    per_sample = sum(a[0].nbytes for a in arrays)
    fit = max(0, (max_packet - _HEADER_ALLOWANCE) // max(1, per_sample))
    if options.batch_size > fit:
        if fit == 0:
            raise JobError(f"one sample is {per_sample} bytes, over the broker's packet limit of {max_packet}: "
                           "raise max_packet_size on the broker and the fleet")
        raise JobError(f"a task of {options.batch_size} samples is {options.batch_size * per_sample} bytes, over the "
                       f"broker's packet limit of {max_packet}: use --batch-size {fit} or less")
    job_id = uuid.uuid4().hex[:12]
    folder = db.dir / "jobs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.save(folder / f"x{i}.npy", a)
    bounds = [(s, min(n, s + options.batch_size)) for s in range(0, n, options.batch_size)]
    db.begin()
    try:
        db.execute("INSERT INTO jobs (id, model, state, options, samples, tasks, output, format, created) "
                   "VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?)",
                   (job_id, model, dumps({**asdict(options), "inputs": len(arrays)}), n, len(bounds),
                    str(output) if output else None, fmt, now))
        db.executemany("INSERT INTO tasks (id, job, idx, start, stop, state) VALUES (?, ?, ?, ?, ?, 'PENDING')",
                       [(f"{job_id}-{i}", job_id, i, a, b) for i, (a, b) in enumerate(bounds)])
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return job_id


def summary(db: FleetDB, job_id: str) -> JobSummary:
    job = db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if job is None:
        raise NotFoundError(f"no job {job_id!r}: list them with edgesdk fleet jobs")
    counts = {s: 0 for s in ("PENDING", "LEASED", "DONE", "FAILED")}
    for r in db.all("SELECT state, COUNT(*) AS n FROM tasks WHERE job = ? GROUP BY state", (job_id,)):
        counts[r["state"]] = r["n"]
    dispatches = db.scalar("SELECT COALESCE(SUM(dispatches), 0) FROM tasks WHERE job = ?", (job_id,)) or 0
    first = db.scalar("SELECT COUNT(*) FROM tasks WHERE job = ? AND dispatches > 0", (job_id,)) or 0
    devices: dict[str, dict[str, float]] = {}
    done_samples = 0
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in db.all("SELECT device, stop - start AS n, elapsed_s, done_at FROM tasks WHERE job = ? AND state = 'DONE'",
                    (job_id,)):
        d = devices.setdefault(r["device"], {"tasks": 0, "samples": 0, "busy_s": 0.0})
        d["tasks"] += 1
        d["samples"] += r["n"]
        done_samples += r["n"]
        spans[r["device"]].append((r["done_at"] - (r["elapsed_s"] or 0.0), r["done_at"]))
    for dev, d in devices.items():
        d["busy_s"] = _union_length(spans[dev])  # overlapping tasks (capacity > 1) count once
        d["throughput"] = d["samples"] / d["busy_s"] if d["busy_s"] > 0 else 0.0
    devices = dict(sorted(devices.items()))
    for d in devices.values():
        d["share"] = d["samples"] / done_samples if done_samples else 0.0
    elapsed = None
    if job["started"] is not None:
        end = job["finished"] or db.scalar("SELECT MAX(done_at) FROM tasks WHERE job = ?", (job_id,))
        elapsed = (end - job["started"]) if end else None
    rate = done_samples / elapsed if elapsed else None
    total_tp = sum(d["throughput"] for d in devices.values())
    eff = rate / total_tp if rate and total_tp else None
    return JobSummary(job["id"], job["model"], job["state"], job["reason"], job["samples"], job["tasks"], counts,
                      done_samples, elapsed, rate, int(dispatches - first), devices, eff, job["output"])


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def list_jobs(db: FleetDB) -> list[JobSummary]:
    return [summary(db, r["id"]) for r in db.all("SELECT id FROM jobs ORDER BY created DESC")]


def collect_outputs(db: FleetDB, job_id: str) -> list[np.ndarray]:
    """The job's outputs, one array per model output, in input order (every task must be DONE)."""
    parts: list[list[np.ndarray]] = []
    for r in db.all("SELECT idx, state, outputs FROM tasks WHERE job = ? ORDER BY idx", (job_id,)):
        if r["state"] != "DONE":
            raise JobError(f"job {job_id}: task {r['idx']} is {r['state']}, results are incomplete")
        tensors = [proto.Result.decode_tensor(t) for t in json.loads(r["outputs"])]
        if not parts:
            parts = [[] for _ in tensors]
        for k, t in enumerate(tensors):
            parts[k].append(t)
    return [np.concatenate(p, axis=0) for p in parts]


def write_results(outputs: Sequence[np.ndarray], path: Path, fmt: str) -> Path:
    """``.npz`` with ``y`` (one output) or ``y0``, ``y1``...; or JSON lines, one per sample in input order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "npz":
        names = ["y"] if len(outputs) == 1 else [f"y{i}" for i in range(len(outputs))]
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(names, outputs)))
    else:
        with open(tmp, "w") as f:
            for i in range(outputs[0].shape[0] if outputs else 0):
                f.write(json.dumps({"index": i, "outputs": [o[i].tolist() for o in outputs]}) + "\n")
    tmp.replace(path)
    return path


@dataclass
class _Slots:
    capacity: int
    free: int
    models: dict[str, str]


class JobController:
    """Dispatches, re-dispatches and collects tasks; called by the fleet's engine thread.

    ``send_task(device, task_id, payload)`` is the seam to MQTT; ``clock`` gives the time.
    """

    def __init__(self, db: FleetDB, registry: Registry, send_task: Callable[[str, str, bytes], None],
                 clock: Callable[[], float]) -> None:
        self.db = db
        self.registry = registry
        self.send_task = send_task
        self.clock = clock
        self.slots: dict[str, _Slots] = {}
        self._inputs: dict[str, list[np.ndarray]] = {}

    # --- events -----------------------------------------------------------------------------------
    def on_work_request(self, msg: proto.WorkRequest) -> None:
        self.slots[msg.device] = _Slots(msg.capacity, msg.free, dict(msg.models))

    def on_device_offline(self, device: str) -> None:
        self.slots.pop(device, None)
        self.db.execute("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL, "
                        "error = 'device ' || ? || ' went offline' WHERE device = ? AND state = 'LEASED'",
                        (device, device))

    def on_result(self, msg: proto.TaskResult) -> None:
        row = self.db.one("SELECT t.*, j.options FROM tasks t JOIN jobs j ON j.id = t.job WHERE t.id = ?", (msg.task,))
        if row is None or row["state"] in ("DONE", "FAILED"):
            return  # unknown, or a duplicate: the first result of a task wins
        now = self.clock()
        error = msg.error
        samples = row["stop"] - row["start"]
        if not error:
            shapes = [t.get("shape", [0])[0] for t in msg.outputs]
            if not shapes or any(s != samples for s in shapes):
                error = f"result holds {shapes} samples per output, expected {samples}"
        if error:
            opts = loads(row["options"])
            if row["dispatches"] >= int(opts.get("max_attempts", 5)):
                self.db.execute("UPDATE tasks SET state = 'FAILED', device = ?, error = ?, done_at = ? WHERE id = ?",
                                (msg.device, error, now, msg.task))
            else:
                self.db.execute("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL, error = ? "
                                "WHERE id = ?", (f"{msg.device}: {error}", msg.task))
            return
        self.db.execute("UPDATE tasks SET state = 'DONE', device = ?, elapsed_s = ?, done_at = ?, outputs = ?, "
                        "lease_until = NULL WHERE id = ?", (msg.device, msg.elapsed_s, now, dumps(msg.outputs), msg.task))

    # --- the periodic step --------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        for r in self.db.all("SELECT t.id, t.device, t.dispatches, j.options FROM tasks t JOIN jobs j ON j.id = t.job "
                             "WHERE j.state = 'RUNNING' AND t.state = 'LEASED' AND t.lease_until < ?", (now,)):
            self.slots.pop(r["device"], None)  # a device that let a lease lapse gets work again once it asks
            limit = int(loads(r["options"]).get("max_attempts", 5))
            state = "FAILED" if r["dispatches"] >= limit else "PENDING"
            self.db.execute("UPDATE tasks SET state = ?, device = NULL, lease_until = NULL, "
                            "error = 'lease expired on ' || ? WHERE id = ?", (state, r["device"] or "?", r["id"]))
        self.dispatch()
        self._complete()

    def dispatch(self) -> int:
        """Send pending tasks to devices with free slots; return how many were sent."""
        jobs = self.db.all("SELECT id, model, options FROM jobs WHERE state = 'RUNNING' ORDER BY created")
        if not jobs or not self.slots:
            return 0
        devices = {r["id"]: (bool(r["online"]), loads(r["tags"])) for r in self.db.all("SELECT id, online, tags FROM devices")}
        outstanding = {r["device"]: r["n"] for r in self.db.all(
            "SELECT device, COUNT(*) AS n FROM tasks WHERE state = 'LEASED' GROUP BY device")}
        sent = 0
        now = self.clock()
        for job in jobs:
            opts = loads(job["options"])
            budgets = {}
            for dev, slot in self.slots.items():
                online, tags = devices.get(dev, (False, {}))
                if online and slot.free > 0 and job["model"] in slot.models and matches(tags, opts.get("selector") or {}):
                    budget = slot.capacity - outstanding.get(dev, 0)
                    if budget > 0:
                        budgets[dev] = budget
            if not budgets:
                continue
            want = sum(budgets.values())
            pending = self.db.all("SELECT id, idx, start, stop, dispatches FROM tasks WHERE job = ? AND state = 'PENDING' "
                                  "ORDER BY idx LIMIT ?", (job["id"], want))
            if not pending:
                continue
            if self.db.scalar("SELECT started FROM jobs WHERE id = ?", (job["id"],)) is None:
                self.db.execute("UPDATE jobs SET started = ? WHERE id = ?", (now, job["id"]))
            inputs = self._job_inputs(job["id"], int(opts.get("inputs", 1)))
            queue = list(pending)
            while queue and budgets:  # one task per device per round: spread evenly, then fill
                for dev in list(budgets):
                    if not queue:
                        break
                    t = queue.pop(0)
                    task = proto.Task(t["id"], job["id"], job["model"], float(opts["lease_s"]),
                                      [x[t["start"] : t["stop"]] for x in inputs], attempt=t["dispatches"] + 1)
                    self.db.execute("UPDATE tasks SET state = 'LEASED', device = ?, lease_until = ?, "
                                    "dispatches = dispatches + 1 WHERE id = ?", (dev, now + float(opts["lease_s"]), t["id"]))
                    self.send_task(dev, t["id"], task.to_payload())
                    outstanding[dev] = outstanding.get(dev, 0) + 1
                    sent += 1
                    budgets[dev] -= 1
                    if budgets[dev] <= 0:
                        del budgets[dev]
        return sent

    def _complete(self) -> None:
        for job in self.db.all("SELECT id, output, format FROM jobs WHERE state = 'RUNNING'"):
            open_tasks = self.db.scalar("SELECT COUNT(*) FROM tasks WHERE job = ? AND state IN ('PENDING', 'LEASED')",
                                        (job["id"],))
            if open_tasks:
                continue
            now = self.clock()
            failed = self.db.all("SELECT idx, error FROM tasks WHERE job = ? AND state = 'FAILED' ORDER BY idx LIMIT 3",
                                 (job["id"],))
            if failed:
                n = self.db.scalar("SELECT COUNT(*) FROM tasks WHERE job = ? AND state = 'FAILED'", (job["id"],))
                reason = f"{n} task(s) failed after every attempt; task {failed[0]['idx']}: {failed[0]['error']}"
                self.db.execute("UPDATE jobs SET state = 'FAILED', reason = ?, finished = ? WHERE id = ?",
                                (reason, now, job["id"]))
                continue
            finished = self.db.scalar("SELECT MAX(done_at) FROM tasks WHERE job = ?", (job["id"],)) or now
            if job["output"]:
                try:
                    write_results(collect_outputs(self.db, job["id"]), Path(job["output"]), job["format"])
                except OSError as exc:
                    self.db.execute("UPDATE jobs SET state = 'FAILED', reason = ?, finished = ? WHERE id = ?",
                                    (f"cannot write results to {job['output']}: {exc}", finished, job["id"]))
                    continue
            self.db.execute("UPDATE jobs SET state = 'SUCCEEDED', finished = ? WHERE id = ?", (finished, job["id"]))
            self._inputs.pop(job["id"], None)

    def _job_inputs(self, job_id: str, count: int) -> list[np.ndarray]:
        arrays = self._inputs.get(job_id)
        if arrays is None:
            folder = self.db.dir / "jobs" / job_id
            arrays = [np.load(folder / f"x{i}.npy", mmap_mode="r") for i in range(count)]
            self._inputs[job_id] = arrays
        return arrays
