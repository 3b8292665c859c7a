"""Distributed batch inference: split a dataset into tasks, let devices pull them, collect every
result exactly once, write the results in input order.

* A job's inputs are copied into the fleet's state (``jobs/<id>/x<i>.npy``) as they will travel
  (:mod:`sdk.encoding`: float inputs of an input the model takes quantised are quantised once,
  here, and sent with their scale and zero point; uint8 images for a normalised input stay
  uint8) and cut into tasks of ``batch_size`` samples, fewer when that many would not fit in
  one message under the broker's packet limit; a task of one sample that still does not fit
  travels in pieces (:class:`~sdk.protocol.TaskPiece`) that the device reassembles. Every task
  is a row in the fleet database (PENDING → LEASED → DONE, or FAILED after ``max_attempts``
  dispatches); the summary reports the bytes sent per sample.
* Dispatch is pull-based: agents announce ``capacity`` and ``free`` slots for the models they
  run (:class:`~sdk.protocol.WorkRequest`), and ``prefetch``, how many more it holds queued;
  the fleet keeps at most ``capacity + prefetch`` of a device's tasks outstanding (LEASED, as
  the database counts them, not as the device last said) and sends none while it announces 0
  free. So the next task is already on the device when one ends (no idle round trip between
  tasks), a fast device returns results sooner and gets more work, and a slow or busy one is
  never flooded: what it holds is bounded by what it asked for. (MQTT shared subscriptions
  deliver round-robin, blind to load, and lose a dead member's unacknowledged messages.)
* Every dispatch holds a lease of ``lease_s``; a task whose lease ends, or whose device goes
  offline (its Last-Will), goes back to PENDING and is dispatched again; a device that let a
  lease lapse gets no more tasks until it announces free slots again (a hung agent does not).
* Results are stored in the database as they arrive (before the agent's outbox entry is
  acknowledged), de-duplicated by task id: the first result of a task wins, a late duplicate
  from a device whose lease had ended is acknowledged and dropped.
* A result is taken only from the device that holds the task's lease, for the model version the
  task was dispatched for (``tasks.version``, what the device announced for that model), with
  outputs that fit: as many as the version's manifest declares (``bundles``), each of its dtype
  (float32 where the agent dequantizes an integer output) and its shape after the batch
  dimension, with one row per sample of the task. When the fleet holds no manifest of that
  version (the device got the model another way), the job's first accepted result sets what
  every later one must be (``jobs.output_spec``); that spec is kept and checked in every case,
  so the results of a job always concatenate. A result that fails these checks is dropped and
  counted (``Fleet.stats["rejected_results"]``); it is still acknowledged (the agent must not
  re-send it forever); when it came from the lease holder it counts as a failed attempt of the
  task (re-queued, FAILED after ``max_attempts``), otherwise the lease stays as it is.
* A job the fleet cannot process (an unreadable row, its input files gone) ends FAILED with
  the reason, and every other job goes on: each job's work runs isolated
  (:data:`fleet.storage.Isolate`).
* A fleet process killed mid-job resumes from the database without redoing finished tasks.

The summary reports samples/s, each device's share and throughput (samples per second of its
own busy time: the union of its tasks' run times, so parallel slots count once), retries, and
the efficiency E = job samples/s ÷ Σ per-device throughput: the fraction of the devices'
combined compute rate that the distribution delivered end to end. (``bench/fleet_bench.py``
measures E as the issue defines it, against single-device runs of the same job.)
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence

import numpy as np

from sdk import protocol as proto
from sdk.encoding import encode_job_inputs
from sdk.errors import JobError, NotFoundError

from .registry import Registry, matches
from .storage import Blobs, FleetDB, Isolate, dumps, loads

log = logging.getLogger("edgesdk.fleet.jobs")

__all__ = ["JobOptions", "JobSummary", "JobController", "OutputSpec", "create_job", "summary", "collect_outputs",
           "write_results", "manifest_output_specs", "output_names"]

FORMATS = ("npz", "jsonl")
#: tasks one dispatch round sends a job at most (the devices it looks at are bounded by it too)
ROUND_TASKS = 1024
#: seconds after its dispatch a task that its device does not report having counts as lost
LOST_AFTER_S = 10.0
#: how often one device's announcements are checked for lost tasks (a query each): a lost task is
#: found between LOST_AFTER_S and LOST_AFTER_S + this after it was sent
RECONCILE_EVERY_S = LOST_AFTER_S
#: ready devices whose leases one query counts while a dispatch round looks for room
_BUDGET_QUERY_DEVICES = 64
_HEADER_ALLOWANCE = 1024  # a task frame's JSON header and MQTT overhead
_PIECE_HEADER = 200  # a task piece's frame header without its task id (index, count and total at their widest)


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
    #: task bytes published for the job (every attempt, every piece), and that over its samples
    bytes_sent: int = 0
    bytes_per_sample: Optional[float] = None
    #: how each input travels (sdk.encoding.ENCODINGS) and its bytes per sample on the wire
    input_encoding: list[str] = field(default_factory=list)
    input_bytes_per_sample: Optional[int] = None
    #: samples per task after cutting tasks to the broker's packet limit (the requested batch size at most)
    task_samples: Optional[int] = None

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELED")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        return d


def create_job(db: FleetDB, blobs: Blobs, model: str, inputs: Sequence[np.ndarray], options: JobOptions, *,
               now: float, output: Optional[str] = None, fmt: str = "npz", max_packet: int = 256 * 1024,
               manifest: Optional[Mapping[str, Any]] = None) -> str:
    """Store the inputs and the task rows of a new job (state RUNNING).

    With the model's ``manifest``, inputs are stored as they will travel (:func:`sdk.encoding.
    encode_job_inputs`: floats for a quantised input are quantised here, once; uint8 for a
    normalised input stays uint8). Tasks hold ``options.batch_size`` samples at most, and fewer
    when that many would not fit in one message of ``max_packet`` bytes; a task of one sample
    that does not fit travels in pieces (:meth:`JobController._dispatch_job`)."""
    options.validate()
    if fmt not in FORMATS:
        raise JobError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    arrays = [np.ascontiguousarray(x) for x in inputs]
    if not arrays or arrays[0].ndim < 1 or arrays[0].shape[0] == 0:
        raise JobError("the job's input data holds no samples")
    n = int(arrays[0].shape[0])
    if any(a.shape[0] != n for a in arrays):
        raise JobError("the job's inputs have different sample counts")
    arrays, quant, encodings = encode_job_inputs(arrays, manifest)
    per_sample = sum(a[0].nbytes for a in arrays)
    fit = max(1, (max_packet - _HEADER_ALLOWANCE) // max(1, per_sample))
    batch = min(options.batch_size, fit)
    if batch < options.batch_size:
        log.info("job on %s: tasks of %d samples (not %d) fit the broker's packet limit of %d bytes%s", model, batch,
                 options.batch_size, max_packet, "; each travels in pieces" if per_sample + _HEADER_ALLOWANCE > max_packet
                 else "")
    job_id = uuid.uuid4().hex[:12]
    for i, a in enumerate(arrays):  # before the job's row: a controller that sees the job finds its inputs
        blobs.put_array("input", f"{job_id}.{i}", a, db)
    bounds = [(s, min(n, s + batch)) for s in range(0, n, batch)]
    stored = {**asdict(options), "inputs": len(arrays), "requested_batch_size": options.batch_size, "batch_size": batch,
              "quant": quant if any(q is not None for q in quant) else [], "encodings": encodings,
              "input_bytes_per_sample": int(per_sample)}
    db.begin()
    try:
        db.execute("INSERT INTO jobs (id, model, state, options, samples, tasks, output, format, created) "
                   "VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?)",
                   (job_id, model, dumps(stored), n, len(bounds),
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
    try:
        opts = loads(job["options"])
    except ValueError:  # a row changed behind the fleet's back: the summary still reads (the job ends FAILED)
        opts = {}
    opts = opts if isinstance(opts, dict) else {}
    sent = int(job["bytes_sent"] or 0)
    return JobSummary(job["id"], job["model"], job["state"], job["reason"], job["samples"], job["tasks"], counts,
                      done_samples, elapsed, rate, int(dispatches - first), devices, eff, job["output"],
                      bytes_sent=sent, bytes_per_sample=sent / job["samples"] if sent and job["samples"] else None,
                      input_encoding=list(opts.get("encodings") or []),
                      input_bytes_per_sample=opts.get("input_bytes_per_sample"), task_samples=opts.get("batch_size"))


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
    """The job's outputs, one array per model output, in input order (every task must be DONE).

    Results are checked when they are accepted, so they fit together; a row changed behind the
    fleet's back still gives a :class:`~sdk.errors.JobError`, never a raw numpy or JSON error."""
    parts: Optional[list[list[np.ndarray]]] = None
    for r in db.all("SELECT idx, state, outputs FROM tasks WHERE job = ? ORDER BY idx", (job_id,)):
        if r["state"] != "DONE":
            raise JobError(f"job {job_id}: task {r['idx']} is {r['state']}, results are incomplete")
        tensors = _stored_outputs(job_id, r["idx"], r["outputs"])
        if parts is None:
            parts = [[] for _ in tensors]
        if len(tensors) != len(parts):
            raise JobError(f"job {job_id}: task {r['idx']} holds {len(tensors)} outputs where task 0 holds "
                           f"{len(parts)}: the job's stored results are inconsistent, run it again")
        for k, t in enumerate(tensors):
            parts[k].append(t)
    try:
        return [np.concatenate(p, axis=0) for p in parts or []]
    except ValueError as exc:
        raise JobError(f"job {job_id}: its stored results do not fit together ({exc}): run it again") from exc


def output_names(db: FleetDB, job_id: str) -> Optional[list[str]]:
    """The signature names of a job's outputs, from the manifest of the version its first result
    came from (None when the fleet holds no such bundle)."""
    row = db.one("SELECT j.model, t.version FROM tasks t JOIN jobs j ON j.id = t.job "
                 "WHERE t.job = ? AND t.state = 'DONE' ORDER BY t.idx LIMIT 1", (job_id,))
    if row is None or not row["version"]:
        return None
    found = db.one("SELECT manifest FROM bundles WHERE model = ? AND version = ? ORDER BY added DESC LIMIT 1",
                   (row["model"], row["version"]))
    return None if found is None else [str(o.get("key") or o.get("name")) for o in loads(found["manifest"])["outputs"]]


def _stored_outputs(job_id: str, idx: int, text: Optional[str]) -> list[np.ndarray]:
    try:
        return [proto.Result.decode_tensor(t) for t in json.loads(text or "null")]
    except Exception as exc:  # whatever the row holds: JSON, base64, dtype or shape errors
        raise JobError(f"job {job_id}: the stored outputs of task {idx} are unreadable "
                       f"({type(exc).__name__}: {exc}): run the job again") from exc


# --- what a task's outputs must be ------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputSpec:
    """One output of a task result: its dtype and its shape after the batch dimension (``None``
    where the model's size is dynamic)."""

    dtype: str
    shape: tuple[Optional[int], ...]

    def fits(self, array: np.ndarray) -> bool:
        return (array.dtype == np.dtype(self.dtype) and array.ndim == len(self.shape) + 1
                and all(d is None or d == n for d, n in zip(self.shape, array.shape[1:])))

    def describe(self) -> str:
        return f"{self.dtype}[N{''.join(', ' + ('?' if d is None else str(d)) for d in self.shape)}]"

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "OutputSpec":
        return cls(str(obj["dtype"]), tuple(None if d is None else int(d) for d in obj["shape"]))

    @classmethod
    def of(cls, array: np.ndarray) -> "OutputSpec":
        return cls(array.dtype.name, tuple(int(d) for d in array.shape[1:]))


def manifest_output_specs(manifest: Mapping[str, Any]) -> list[OutputSpec]:
    """What an agent answers for a bundle with this manifest: each output's dtype (float32 for
    a quantized integer output, which the agent dequantizes) and shape after the batch dimension."""
    specs = []
    for t in manifest["outputs"]:
        dtype = np.dtype(str(t["dtype"]))
        quantized = float(t.get("scale") or 0.0) != 0.0 and dtype.kind in "iu"
        shape = [int(d) for d in t.get("shape") or []]
        signature = [int(d) for d in t.get("shape_signature") or shape]
        if len(signature) != len(shape):
            signature = shape
        specs.append(OutputSpec("float32" if quantized else dtype.name,
                                tuple(None if sig <= 0 or d <= 0 else d for d, sig in zip(shape[1:], signature[1:]))))
    return specs


class _UnfitOutputs(ValueError):
    """A result's outputs do not fit the task (the message says how)."""


def decode_outputs(encoded: Any, samples: int, *expected: Optional[Sequence[OutputSpec]]) -> list[np.ndarray]:
    """Decode a result's outputs (arrays, as a decoded :class:`~sdk.protocol.TaskResult` holds
    them, or ``Result.encode_tensor`` objects, as stored) and check them: numeric tensors of
    ``samples`` rows each, fitting every given spec list (``None`` = not known). Raises
    :class:`_UnfitOutputs` saying what is wrong."""
    if not isinstance(encoded, list) or not encoded:
        raise _UnfitOutputs("the result holds no outputs")
    arrays = []
    for k, t in enumerate(encoded):
        try:
            a = t if isinstance(t, np.ndarray) else proto.Result.decode_tensor(t)
        except Exception as exc:  # decoders of the past raised binascii, numpy and type errors
            raise _UnfitOutputs(f"output {k} does not decode: {exc}") from exc
        if a.dtype.kind not in "biuf" or a.ndim < 1 or a.shape[0] != samples:
            raise _UnfitOutputs(f"output {k} is {a.dtype.name}{list(a.shape)}; a numeric tensor with {samples} rows "
                                "(one per sample of the task) was expected")
        arrays.append(a)
    for specs in expected:
        if specs is None:
            continue
        if len(specs) != len(arrays) or not all(s.fits(a) for s, a in zip(specs, arrays)):
            got = ", ".join(OutputSpec.of(a).describe() for a in arrays)
            want = ", ".join(s.describe() for s in specs)
            raise _UnfitOutputs(f"outputs {got} do not match {want}")
    return arrays


def result_names(count: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """The keys of a results ``.npz``: ``y`` for one output; for several, the outputs' signature
    names (from the model's manifest) when they are known, distinct ids and none of numpy's own
    ``savez`` arguments, else ``y0``, ``y1``..."""
    if count == 1:
        return ["y"]
    usable = (names is not None and len(names) == count and len(set(names)) == count
              and all(isinstance(n, str) and proto.ID_PATTERN.fullmatch(n) and n not in ("file", "allow_pickle")
                      for n in names))
    return list(names) if usable else [f"y{i}" for i in range(count)]  # type: ignore[arg-type]


def write_results(outputs: Sequence[np.ndarray], path: Path, fmt: str, names: Optional[Sequence[str]] = None) -> Path:
    """``.npz`` with ``y`` (one output) or one array per output named as :func:`result_names` says;
    or JSON lines, one per sample in input order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "npz":
        names = result_names(len(outputs), names)
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(names, outputs)))
    else:
        with open(tmp, "w") as f:
            for i in range(outputs[0].shape[0] if outputs else 0):
                f.write(json.dumps({"index": i, "outputs": [o[i].tolist() for o in outputs]}) + "\n")
    tmp.replace(path)
    return path


def _seconds_or_none(value: Any) -> Optional[float]:
    """A device's reported run time, when it is a plausible one (it feeds the job's figures)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else None


@dataclass
class _Slots:
    capacity: int
    free: int
    models: dict[str, str]
    prefetch: int = 0

    @property
    def limit(self) -> int:
        """Tasks of the device's that may be outstanding at once: running plus queued."""
        return self.capacity + self.prefetch


class JobController:
    """Dispatches, re-dispatches and collects tasks; called by the fleet's engine thread.

    ``send_task(device, task_id, payload)`` is the seam to MQTT; ``clock`` gives the time;
    ``isolate`` runs one job's work so that its failure marks that job FAILED and leaves the
    others alone; ``stats`` counts results by verdict (``rejected_results``, ``late_results``...).
    """

    def __init__(self, db: FleetDB, registry: Registry, send_task: Callable[[str, str, bytes], None],
                 clock: Callable[[], float], *, isolate: Isolate, stats: MutableMapping[str, int],
                 max_packet: Callable[[], int] = lambda: 256 * 1024, blobs: Blobs) -> None:
        self.max_packet = max_packet  # the broker's packet limit as the fleet's connection knows it now
        self.db = db
        self.blobs = blobs  # the jobs' inputs
        self.registry = registry
        self.send_task = send_task
        self.clock = clock
        self.isolate = isolate
        self.stats = stats
        self.slots: dict[str, _Slots] = {}
        #: model -> devices that announced free slots for it (insertion-ordered: the longest
        #: waiting first); a dispatch round looks at these only, never at the whole fleet
        self.ready: dict[str, dict[str, None]] = defaultdict(dict)
        self._inputs: dict[str, list[np.ndarray]] = {}
        self._reconciled: dict[str, float] = {}  # device -> when its announcement was last checked
        self._jobs_running = True  # as of the last tick: no lost task to look for while no job runs
        self._version_specs: dict[tuple[str, str], list[OutputSpec]] = {}

    def _isolated(self, job_id: str, step: Callable[[], None]) -> bool:
        return self.isolate(f"job {job_id}", step, lambda reason: self.fail(job_id, reason))

    def fail(self, job_id: str, reason: str) -> None:
        """The fleet cannot process this job: FAILED with ``reason`` (its tasks stay as they are)."""
        log.error("job %s FAILED: %s", job_id, reason)
        self.db.execute("UPDATE jobs SET state = 'FAILED', reason = ?, finished = ? WHERE id = ? AND state = 'RUNNING'",
                        (reason, self.clock(), job_id))
        self._inputs.pop(job_id, None)

    # --- events -----------------------------------------------------------------------------------
    def on_work_request(self, msg: proto.WorkRequest) -> None:
        now = self.clock()
        if (msg.done is not None and self._jobs_running
                and now - self._reconciled.get(msg.device, -RECONCILE_EVERY_S) >= RECONCILE_EVERY_S):
            self._reconciled[msg.device] = now
            self._reconcile(msg.device, set(msg.running) | set(msg.done))
        self._unready(msg.device)
        self.slots[msg.device] = slot = _Slots(msg.capacity, msg.free, dict(msg.models), msg.prefetch)
        if slot.free > 0:
            for model in slot.models:
                self.ready[model][msg.device] = None

    def _reconcile(self, device: str, has: set[str]) -> None:
        """Put back in the queue the tasks leased to ``device`` that it does not have (neither held
        nor finished): lost on the way (a broker that died with them in flight, a controller that
        died between its commit and its publish). Only those leased :data:`LOST_AFTER_S` ago or
        more: a task just sent may not have arrived when the device spoke."""
        now = self.clock()
        lost = []
        for r in self.db.all("SELECT t.id, t.lease_until, j.options FROM tasks t JOIN jobs j ON j.id = t.job "
                             "WHERE t.device = ? AND t.state = 'LEASED' AND j.state = 'RUNNING'", (device,)):
            if r["id"] in has:
                continue
            try:
                leased_at = float(r["lease_until"]) - float(loads(r["options"])["lease_s"])
            except (ValueError, KeyError, TypeError):
                continue  # an unreadable job: its own step fails it
            if leased_at <= now - LOST_AFTER_S:
                lost.append(r["id"])
        if lost:
            log.info("%d task(s) leased to %s never reached it: back in the queue", len(lost), device)
            self.stats["lost_tasks"] += len(lost)
            self.db.executemany("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL, "
                                "error = 'lost on the way to ' || ? WHERE id = ? AND state = 'LEASED'",
                                [(device, t) for t in lost])

    def _unready(self, device: str) -> None:
        """``device`` gets no task until it announces free slots again."""
        slot = self.slots.pop(device, None)
        for model in slot.models if slot else ():
            self.ready[model].pop(device, None)

    def on_device_offline(self, device: str) -> None:
        self._unready(device)
        self.db.execute("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL, "
                        "error = 'device ' || ? || ' went offline' WHERE device = ? AND state = 'LEASED'",
                        (device, device))

    def on_result(self, msg: proto.TaskResult) -> None:
        """A task's result (``msg.device`` is the device of the topic it came on): taken, counted
        as a failed attempt, or dropped; see the module docstring for the rules."""
        row = self.db.one("SELECT t.*, j.model, j.state AS job_state, j.options, j.output_spec FROM tasks t "
                          "JOIN jobs j ON j.id = t.job WHERE t.id = ?", (msg.task,))
        if row is None or row["job"] != msg.job:
            self._reject(msg, "unknown_task", f"job {msg.job} has no task {msg.task}")
        elif row["state"] in ("DONE", "FAILED") or row["job_state"] != "RUNNING":
            self.stats["late_results"] += 1  # a duplicate, or a job that ended: the first result of a task won
        elif row["state"] != "LEASED" or row["device"] != msg.device:
            holder = f"is leased to {row['device']}" if row["state"] == "LEASED" else f"is {row['state']} (no lease)"
            self._reject(msg, "not_leased", f"the task {holder}")
        else:
            self._isolated(row["job"], lambda: self._from_lease_holder(row, msg))

    def _from_lease_holder(self, row: Any, msg: proto.TaskResult) -> None:
        if msg.error:
            self._failed_attempt(row, msg.device, msg.error)
            return
        if row["version"] and msg.version != row["version"]:
            self._reject(msg, "wrong_version", f"it comes from version {msg.version!r} of {row['model']}, the task was "
                                               f"sent for version {row['version']!r}")
            self._failed_attempt(row, msg.device, f"result from the wrong model version {msg.version!r}")
            return
        job_spec = [OutputSpec.from_json(s) for s in loads(row["output_spec"])] if row["output_spec"] else None
        try:
            arrays = decode_outputs(msg.outputs, row["stop"] - row["start"],
                                    self._specs_of_version(row["model"], row["version"] or msg.version), job_spec)
        except _UnfitOutputs as exc:
            self._reject(msg, "bad_outputs", str(exc))
            self._failed_attempt(row, msg.device, f"result refused: {exc}")
            return
        if job_spec is None:
            self.db.execute("UPDATE jobs SET output_spec = ? WHERE id = ?",
                            (dumps([OutputSpec.of(a).to_json() for a in arrays]), row["job"]))
        elapsed = _seconds_or_none(msg.elapsed_s)
        self.db.execute("UPDATE tasks SET state = 'DONE', device = ?, elapsed_s = ?, done_at = ?, outputs = ?, "
                        "lease_until = NULL WHERE id = ?",
                        (msg.device, elapsed, self.clock(), dumps([proto.Result.encode_tensor(a) for a in arrays]),
                         row["id"]))
        self.stats["accepted_results"] += 1

    def _failed_attempt(self, row: Any, device: str, error: str) -> None:
        """An error result, or an unfit one from the lease holder: re-queue, or FAILED after max_attempts."""
        if row["dispatches"] >= int(loads(row["options"]).get("max_attempts", 5)):
            self.db.execute("UPDATE tasks SET state = 'FAILED', device = ?, error = ?, done_at = ?, lease_until = NULL "
                            "WHERE id = ?", (device, error, self.clock(), row["id"]))
        else:
            self.db.execute("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL, error = ? "
                            "WHERE id = ?", (f"{device}: {error}", row["id"]))

    def _reject(self, msg: proto.TaskResult, why: str, detail: str) -> None:
        log.warning("dropped the result of task %s from %s: %s", msg.task, msg.device, detail)
        self.stats["rejected_results"] += 1
        self.stats[f"rejected_results.{why}"] += 1

    def _specs_of_version(self, model: str, version: str) -> Optional[list[OutputSpec]]:
        """The output specs of ``model`` ``version`` from its manifest, when the fleet holds its bundle."""
        key = (model, version)
        if key not in self._version_specs:
            row = self.db.one("SELECT manifest FROM bundles WHERE model = ? AND version = ? ORDER BY added DESC LIMIT 1",
                              key)
            if row is None:
                return None  # not cached: the bundle may be added later
            self._version_specs[key] = manifest_output_specs(loads(row["manifest"]))
        return self._version_specs[key]

    # --- the periodic step --------------------------------------------------------------------------
    def tick(self) -> None:
        """Expire leases, dispatch, and finish complete jobs: each job's part isolated."""
        now = self.clock()
        running = self.db.all("SELECT id, options FROM jobs WHERE state = 'RUNNING'")
        self._jobs_running = bool(running)
        for job in running:
            self._isolated(job["id"], lambda j=job: (self._options(j), self._expire_leases(j, now)))
        self.dispatch()
        for job in self.db.all("SELECT id, output, format FROM jobs WHERE state = 'RUNNING'"):
            self._isolated(job["id"], lambda j=job: self._complete(j))

    def _options(self, job: Any) -> dict[str, Any]:
        """A job's options as stored (read at every tick, so a job whose row cannot be read
        fails at once, with the reason, whether or not a device could run it)."""
        opts = loads(job["options"])
        if not isinstance(opts, dict) or "lease_s" not in opts:
            raise JobError(f"its options are not a job's: {str(job['options'])[:80]}")
        return opts

    def _expire_leases(self, job: Any, now: float) -> None:
        expired = self.db.all("SELECT id, device, dispatches FROM tasks WHERE job = ? AND state = 'LEASED' "
                              "AND lease_until < ?", (job["id"], now))
        if not expired:
            return
        limit = int(self._options(job).get("max_attempts", 5))
        for r in expired:
            self._unready(r["device"])  # a device that let a lease lapse gets work again once it asks
            state = "FAILED" if r["dispatches"] >= limit else "PENDING"
            self.db.execute("UPDATE tasks SET state = ?, device = NULL, lease_until = NULL, "
                            "error = 'lease expired on ' || ? WHERE id = ?", (state, r["device"] or "?", r["id"]))

    def dispatch(self) -> int:
        """Send pending tasks to devices with free slots; return how many were sent. A round
        looks only at devices that announced free slots, and at no more of them than it fills,
        so its cost follows the tasks it sends, not the size of the fleet."""
        if not any(self.ready.values()):
            return 0
        sent = 0
        for job in self.db.all("SELECT id, model, options FROM jobs WHERE state = 'RUNNING' ORDER BY created"):
            if self.ready.get(job["model"]):
                count = [0]
                self._isolated(job["id"], lambda j=job: count.__setitem__(0, self._dispatch_job(j)))
                sent += count[0]
        return sent

    def _budgets(self, model: str, selector: Mapping[str, str]) -> dict[str, int]:
        """Ready devices for ``model`` matching ``selector``, each with how many more tasks it may
        hold (``capacity + prefetch`` less its leases), until :data:`ROUND_TASKS` are found. The
        leases are counted for many devices per query (a query is a round trip on PostgreSQL),
        and the ready set is read only as far as the round needs."""
        budgets: dict[str, int] = {}
        ready = self.ready[model]
        group: list[str] = []
        for dev in list(ready):
            online, tags = self.registry.presence(dev)
            if not online:
                self._unready(dev)
                continue
            if not matches(tags, selector):
                continue
            group.append(dev)
            if len(group) == _BUDGET_QUERY_DEVICES:
                budgets.update(self._room(group, ready))
                group = []
                if sum(budgets.values()) >= ROUND_TASKS:
                    return budgets
        budgets.update(self._room(group, ready))
        return budgets

    def _room(self, group: list[str], ready: dict[str, None]) -> dict[str, int]:
        """How many more tasks each device of ``group`` may hold, from one query; a device with
        no room leaves ``ready`` until it announces free slots again."""
        if not group:
            return {}
        leased = {r["device"]: int(r["n"]) for r in self.db.all(
            "SELECT device, COUNT(*) AS n FROM tasks WHERE state = 'LEASED' AND device IN "
            f"({', '.join('?' * len(group))}) GROUP BY device", group)}
        room: dict[str, int] = {}
        for dev in group:
            budget = self.slots[dev].limit - leased.get(dev, 0)
            if budget > 0:
                room[dev] = budget
            else:
                ready.pop(dev, None)
        return room

    def _dispatch_job(self, job: Any) -> int:
        opts = self._options(job)
        budgets = self._budgets(job["model"], opts.get("selector") or {})
        if not budgets:
            return 0
        pending = self.db.all("SELECT id, idx, start, stop, dispatches FROM tasks WHERE job = ? AND state = 'PENDING' "
                              "ORDER BY idx LIMIT ?", (job["id"], sum(budgets.values())))
        if not pending:
            return 0
        now = self.clock()
        if self.db.scalar("SELECT started FROM jobs WHERE id = ?", (job["id"],)) is None:
            self.db.execute("UPDATE jobs SET started = ? WHERE id = ?", (now, job["id"]))
        inputs = self._job_inputs(job["id"], int(opts.get("inputs", 1)))
        lease_s = float(opts["lease_s"])
        queue = deque(pending)
        sent = 0
        round_bytes = 0
        leases: list[tuple[str, float, str, str]] = []  # written in one statement after the round
        while queue and budgets:  # one task per device per pass: spread evenly, then fill
            for dev in list(budgets):
                if not queue:
                    break
                t = queue.popleft()
                task = proto.Task(t["id"], job["id"], job["model"], lease_s, [x[t["start"] : t["stop"]] for x in inputs],
                                  attempt=t["dispatches"] + 1, quant=list(opts.get("quant") or []))
                leases.append((dev, now + lease_s, self.slots[dev].models[job["model"]], t["id"]))
                for frame in self._frames(dev, task):
                    self.send_task(dev, t["id"], frame)
                    round_bytes += len(frame)
                sent += 1
                budgets[dev] -= 1
                if budgets[dev] <= 0:
                    del budgets[dev]
                    self.ready[job["model"]].pop(dev, None)  # full: back when it announces free slots
        self.db.executemany("UPDATE tasks SET state = 'LEASED', device = ?, lease_until = ?, version = ?, "
                            "dispatches = dispatches + 1 WHERE id = ?", leases)
        if round_bytes:
            self.db.execute("UPDATE jobs SET bytes_sent = bytes_sent + ? WHERE id = ?", (round_bytes, job["id"]))
        return sent

    def _frames(self, device: str, task: proto.Task) -> list[bytes]:
        """What to publish for ``task``: its frame, or its pieces when the frame (with the topic
        and MQTT's overhead) exceeds the broker's packet limit the fleet knows now."""
        frame = task.to_payload()
        limit = self.max_packet()
        overhead = len(proto.topic(device, "task").encode()) + 16  # as MqttConnection.publish counts
        if len(frame) + overhead <= limit:
            return [frame]
        room = limit - overhead - _PIECE_HEADER - len(task.id)
        if room < 1:
            raise JobError(f"the broker's packet limit of {limit} bytes leaves no room for a task piece: raise "
                           "max_packet_size on the broker")
        pieces = proto.split_task(frame, task.id, room)
        self.stats["task_pieces"] += len(pieces)
        return [p.to_payload() for p in pieces]

    def _complete(self, job: Any) -> None:
        open_tasks = self.db.scalar("SELECT COUNT(*) FROM tasks WHERE job = ? AND state IN ('PENDING', 'LEASED')",
                                    (job["id"],))
        if open_tasks:
            return
        now = self.clock()
        failed = self.db.all("SELECT idx, error FROM tasks WHERE job = ? AND state = 'FAILED' ORDER BY idx LIMIT 3",
                             (job["id"],))
        if failed:
            n = self.db.scalar("SELECT COUNT(*) FROM tasks WHERE job = ? AND state = 'FAILED'", (job["id"],))
            reason = f"{n} task(s) failed after every attempt; task {failed[0]['idx']}: {failed[0]['error']}"
            self.db.execute("UPDATE jobs SET state = 'FAILED', reason = ?, finished = ? WHERE id = ?",
                            (reason, now, job["id"]))
            return
        finished = self.db.scalar("SELECT MAX(done_at) FROM tasks WHERE job = ?", (job["id"],)) or now
        try:  # results are checked as they arrive; this catches rows changed behind the fleet's back
            collect_outputs(self.db, job["id"])
        except JobError as exc:
            self.db.execute("UPDATE jobs SET state = 'FAILED', reason = ?, finished = ? WHERE id = ?",
                            (str(exc), finished, job["id"]))
            return
        self.db.execute("UPDATE jobs SET state = 'SUCCEEDED', finished = ? WHERE id = ?", (finished, job["id"]))
        self._inputs.pop(job["id"], None)

    def _job_inputs(self, job_id: str, count: int) -> list[np.ndarray]:
        arrays = self._inputs.get(job_id)
        if arrays is None:
            arrays = [self.blobs.array("input", f"{job_id}.{i}", self.db) for i in range(count)]
            self._inputs[job_id] = arrays
        return arrays
