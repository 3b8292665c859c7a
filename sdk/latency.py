"""Latency measurement: warm up, run N times, report percentiles.

Used by the converter's report, the agent's install health check and the benchmarks, so all
three measure the same way. The clock is a seam (``clock`` returns nanoseconds).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

__all__ = ["LatencyStats", "measure", "summarize"]


@dataclass
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples_ns: "list[int] | np.ndarray") -> LatencyStats:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        return LatencyStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(int(ms.size), float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()))


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    runs: int = 50,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> LatencyStats:
    """Call ``fn`` ``warmup`` times unmeasured, then ``runs`` times measured."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return summarize(samples)


def measure_interleaved(
    fns: "dict[str, Callable[[], object]]",
    *,
    warmup: int = 5,
    runs: int = 50,
    min_seconds: float = 0.0,
    block: int = 10,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> "dict[str, LatencyStats]":
    """Measure several functions in interleaved blocks, so drift (frequency scaling, other load)
    is shared evenly instead of favouring whichever ran first.

    Each round runs every function ``block + 1`` times in a row and keeps the last ``block``
    samples (the first call re-warms caches the other functions evicted, as a device that runs
    one model would have them warm). Rounds continue until every function has ``runs`` samples
    and ``min_seconds`` have passed (sub-millisecond models need many runs for a stable p50).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[int]] = {k: [] for k in fns}
    start = clock()
    while True:
        for key, fn in fns.items():
            fn()
            for _ in range(block):
                t0 = clock()
                fn()
                samples[key].append(clock() - t0)
        done = min(len(v) for v in samples.values())
        if done >= runs and (clock() - start) >= min_seconds * 1e9:
            break
        if done >= 100 * max(1, runs):
            break
    return {k: summarize(v) for k, v in samples.items()}
