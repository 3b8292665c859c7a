from sdk.latency import measure, measure_interleaved, summarize


class FakeClock:
    """A clock that advances only when the measured function runs (the seam measure() takes)."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def test_measure_reports_percentiles_of_what_it_timed() -> None:
    clock = FakeClock()
    durations = iter([10_000_000] * 5 + [1_000_000 * i for i in range(1, 101)])  # warm-up 10 ms, then 1..100 ms

    def fn():
        clock.now += next(durations)

    stats = measure(fn, warmup=5, runs=100, clock=clock)
    assert stats.runs == 100 and stats.min_ms == 1.0
    assert stats.p50_ms == 50.5 and 99 <= stats.p99_ms <= 100


def test_interleaved_blocks_drop_the_rewarm_call_and_share_drift() -> None:
    clock = FakeClock()
    calls = {"a": 0, "b": 0}

    def make(key, cost_ms):
        def fn():
            calls[key] += 1
            # the first call of every block is slow (cold cache): it must never be recorded
            clock.now += int((cost_ms * 5 if calls[key] % 11 == 6 else cost_ms) * 1e6)
        return fn

    stats = measure_interleaved({"a": make("a", 1.0), "b": make("b", 2.0)}, warmup=5, runs=30, block=10, clock=clock)
    assert stats["a"].runs == stats["b"].runs == 30
    assert stats["a"].p99_ms == 1.0 and stats["b"].p99_ms == 2.0
    assert calls["a"] == 5 + 3 * 11


def test_summarize_empty() -> None:
    assert summarize([]).runs == 0
