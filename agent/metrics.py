"""Per-model latency histograms and counters, in heartbeats and on a Prometheus endpoint.

Buckets are fixed and log-spaced (10 µs to ~10 s, ratio 1.25), so recording is one bisect and a
counter increment under a lock, and percentiles (p50/p90/p99) are read from the buckets with
at most 25 % relative error; the exact minimum and maximum are kept beside them.
"""

from __future__ import annotations

import bisect
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

__all__ = ["Histogram", "ModelStats", "prometheus_text", "MetricsServer"]

_BOUNDS = [10e-6 * 1.25**i for i in range(63)]  # seconds, upper bounds: 10 µs .. ~12 s


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.total = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = 0.0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        i = bisect.bisect_left(_BOUNDS, seconds)
        with self._lock:
            self.counts[i] += 1
            self.total += 1
            self.sum += seconds
            if seconds < self.min:
                self.min = seconds
            if seconds > self.max:
                self.max = seconds

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (seconds), clamped to [min, max]."""
        with self._lock:
            if self.total == 0:
                return 0.0
            rank = q * self.total
            seen = 0
            for i, c in enumerate(self.counts):
                seen += c
                if seen >= rank and c:
                    bound = _BOUNDS[i] if i < len(_BOUNDS) else self.max
                    return min(max(bound, self.min), self.max)
            return self.max

    def summary(self) -> dict[str, float]:
        return {
            "count": self.total,
            "p50_ms": 1e3 * self.quantile(0.50),
            "p90_ms": 1e3 * self.quantile(0.90),
            "p99_ms": 1e3 * self.quantile(0.99),
            "mean_ms": 1e3 * self.sum / self.total if self.total else 0.0,
        }


class ModelStats:
    """What a model's engine records: latency of successful requests, request and error counts."""

    def __init__(self) -> None:
        self.latency = Histogram()
        self.requests = 0
        self.errors = 0
        self._lock = threading.Lock()

    def ok(self, seconds: float) -> None:
        self.latency.record(seconds)
        with self._lock:
            self.requests += 1

    def error(self) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1

    def summary(self) -> dict[str, float]:
        return {**self.latency.summary(), "requests": self.requests, "errors": self.errors}


def prometheus_text(stats: dict[str, tuple[str, ModelStats]], dropped: Optional[dict[str, int]] = None) -> str:
    """Prometheus text exposition for ``{model: (version, stats)}`` and ``{channel: messages dropped}``."""
    out = [
        "# HELP edgesdk_inference_seconds Inference latency of successful requests.",
        "# TYPE edgesdk_inference_seconds histogram",
    ]
    for model, (version, st) in sorted(stats.items()):
        labels = f'model="{model}",version="{version}"'
        h = st.latency
        with h._lock:
            counts, total, total_sum = list(h.counts), h.total, h.sum
        cumulative = 0
        for bound, c in zip(_BOUNDS, counts):
            cumulative += c
            out.append(f'edgesdk_inference_seconds_bucket{{{labels},le="{bound:.6g}"}} {cumulative}')
        out.append(f'edgesdk_inference_seconds_bucket{{{labels},le="+Inf"}} {total}')
        out.append(f"edgesdk_inference_seconds_sum{{{labels}}} {total_sum:.9f}")
        out.append(f"edgesdk_inference_seconds_count{{{labels}}} {total}")
    out.append("# HELP edgesdk_requests_total Inference requests, successful or not.")
    out.append("# TYPE edgesdk_requests_total counter")
    for model, (version, st) in sorted(stats.items()):
        out.append(f'edgesdk_requests_total{{model="{model}",version="{version}"}} {st.requests}')
    out.append("# HELP edgesdk_request_errors_total Requests that failed (bad input, runtime error).")
    out.append("# TYPE edgesdk_request_errors_total counter")
    for model, (version, st) in sorted(stats.items()):
        out.append(f'edgesdk_request_errors_total{{model="{model}",version="{version}"}} {st.errors}')
    out.append("# HELP edgesdk_dropped_messages_total Messages from the fleet's side dropped: undecodable, hostile, "
               "or for no running transfer.")
    out.append("# TYPE edgesdk_dropped_messages_total counter")
    for channel, count in sorted((dropped or {}).items()):
        out.append(f'edgesdk_dropped_messages_total{{channel="{channel}"}} {count}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` on 127.0.0.1:port (port 0 picks a free one; see :attr:`port`)."""

    def __init__(self, port: int, render: Callable[[], str], host: str = "127.0.0.1") -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgesdk-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
