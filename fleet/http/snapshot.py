"""The fleet at a glance, as one JSON document: what the dashboard draws and the event stream sends.

Read through the facade each time (devices, the newest rollouts with their devices, the newest
jobs), so it is whatever the fleet's database says, from this process or any other.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

__all__ = ["fleet_snapshot", "throughput_series", "stages"]


def fleet_snapshot(fleet: Any, *, rollouts: int = 8, jobs: int = 8, charts: int = 3) -> dict[str, Any]:
    """Devices, the ``rollouts`` newest rollouts (with stages and per-state counts), the ``jobs``
    newest jobs (with a throughput series for the ``charts`` newest of them) and totals."""
    devices = [_device(d) for d in fleet.devices()]
    shown_rollouts = []
    for view in fleet.rollouts()[:rollouts]:
        full = fleet.rollout(view.id)
        shown_rollouts.append({**{k: v for k, v in full.to_dict().items() if k != "devices"},
                               "done": full.done, "stages": stages(full.devices), "devices": full.devices})
    shown_jobs = []
    for i, job in enumerate(fleet.jobs_list()[:jobs]):
        d = job.to_dict()
        d["done"] = job.done
        d["throughput"] = throughput_series(fleet.task_log(job.id)) if i < charts else None
        shown_jobs.append(d)
    return {
        "at": time.time(),
        "totals": {"devices": len(devices), "online": sum(1 for d in devices if d["online"]),
                   "rollouts_active": sum(1 for r in shown_rollouts if not r["done"]),
                   "jobs_running": sum(1 for j in shown_jobs if j["state"] == "RUNNING")},
        "devices": devices,
        "rollouts": shown_rollouts,
        "jobs": shown_jobs,
    }


def _device(info: Any) -> dict[str, Any]:
    d = info.to_dict()
    d.pop("bundles", None)  # digests: long, and not for a glance
    return d


def stages(devices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per stage of a rollout (canary first): its devices' count per state."""
    by_stage: dict[int, dict[str, int]] = {}
    for d in devices:
        counts = by_stage.setdefault(int(d["stage"]), {})
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    return [{"stage": s, "devices": sum(c.values()), "counts": c} for s, c in sorted(by_stage.items())]


def throughput_series(tasks: Sequence[Mapping[str, Any]], points: int = 60) -> list[list[float]]:
    """``[[seconds since the job's first task started, samples/s], ...]`` in ``points`` bins at most.

    ``tasks`` are :meth:`fleet.Fleet.task_log` rows (``samples``, ``elapsed_s`` on the device,
    ``done_at`` here); a task's samples count in the bin of its ``done_at``."""
    done = [t for t in tasks if t.get("done_at") is not None]
    if not done:
        return []
    start = min(t["done_at"] - (t.get("elapsed_s") or 0.0) for t in done)
    end = max(t["done_at"] for t in done)
    width = max((end - start) / points, 0.05)
    bins = [0.0] * (int((end - start) / width) + 1)
    for t in done:
        bins[min(len(bins) - 1, int((t["done_at"] - start) / width))] += t["samples"]
    return [[round((i + 1) * width, 3), round(n / width, 1)] for i, n in enumerate(bins)]
