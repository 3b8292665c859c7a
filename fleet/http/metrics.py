"""Prometheus metrics of the fleet, on the HTTP server's ``/metrics`` (``prometheus-client``).

:class:`FleetCollector` reads the fleet through its facade at scrape time (devices, rollouts,
jobs, :attr:`fleet.Fleet.stats`): nothing is kept twice. The one figure with no home in the
facade, the engine's batch latency, is a histogram here, fed by the engine's
:attr:`fleet.Fleet.on_batch` callback (:meth:`FleetMetrics.observe_batch`).

Exported (every name starts with ``edgesdk_fleet_``): ``devices{presence}``,
``rollouts{state}``, ``rollout_devices{rollout,model,version,state}`` (running rollouts),
``jobs{state}``, ``job_samples_per_second{job,model}`` and ``job_tasks_outstanding{job,model,
state}`` (running jobs), ``job_samples_done_total``, ``messages_received_total{kind}``,
``messages_sent_total{channel}`` (the ``sent.<channel>`` counts of ``Fleet.stats``),
``engine_events_total{event}`` (the rest of ``Fleet.stats``: drops and why, duplicates, chunks
sent...), ``engine_batch_seconds`` and ``engine_batch_messages_total``.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sdk import protocol as proto

from ..rollout import ACTIVE, DEVICE_STATES, FINISHED

__all__ = ["FleetMetrics", "FleetCollector"]

_KINDS = frozenset(c.TYPE for c in proto.MESSAGE_CLASSES)
#: ``Fleet.stats`` keys ``sent.<channel>``: messages published on that channel
_SENT = "sent."
_JOB_STATES = ("RUNNING", "SUCCEEDED", "FAILED", "CANCELED")
#: engine batches take from under a millisecond (a heartbeat) to seconds (a thousand results and an fsync)
_BATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FleetCollector(Collector):
    """Reads the fleet at scrape time (see the module's docstring for what it exports)."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        yield from self._devices()
        yield from self._rollouts()
        yield from self._jobs()
        yield from self._messages()

    def _devices(self) -> Iterator[Metric]:
        devices = self.fleet.devices()
        g = GaugeMetricFamily("edgesdk_fleet_devices", "Devices known to the fleet, by presence.", labels=["presence"])
        online = sum(1 for d in devices if d.online)
        g.add_metric(["online"], online)
        g.add_metric(["offline"], len(devices) - online)
        yield g

    def _rollouts(self) -> Iterator[Metric]:
        views = self.fleet.rollouts()
        by_state = GaugeMetricFamily("edgesdk_fleet_rollouts", "Rollouts by state.", labels=["state"])
        for state in (*ACTIVE, *FINISHED):
            by_state.add_metric([state], sum(1 for v in views if v.state == state))
        yield by_state
        devices = GaugeMetricFamily("edgesdk_fleet_rollout_devices", "Devices of each running rollout, by state.",
                                    labels=["rollout", "model", "version", "state"])
        for v in views:
            if not v.done:
                for state in DEVICE_STATES:
                    devices.add_metric([v.id, v.model, v.version, state], v.counts.get(state, 0))
        yield devices

    def _jobs(self) -> Iterator[Metric]:
        jobs = self.fleet.jobs_list()
        by_state = GaugeMetricFamily("edgesdk_fleet_jobs", "Batch jobs by state.", labels=["state"])
        for state in _JOB_STATES:
            by_state.add_metric([state], sum(1 for j in jobs if j.state == state))
        yield by_state
        rate = GaugeMetricFamily("edgesdk_fleet_job_samples_per_second",
                                 "Samples per second of each running job since it started.", labels=["job", "model"])
        outstanding = GaugeMetricFamily("edgesdk_fleet_job_tasks_outstanding",
                                        "Tasks of each running job not done yet: PENDING (not sent) or LEASED (on a device).",
                                        labels=["job", "model", "state"])
        for j in jobs:
            if j.state == "RUNNING":
                rate.add_metric([j.id, j.model], float(j.samples_per_s or 0.0))
                for state in ("PENDING", "LEASED"):
                    outstanding.add_metric([j.id, j.model, state], j.counts.get(state, 0))
        yield rate
        yield outstanding
        yield CounterMetricFamily("edgesdk_fleet_job_samples_done", "Samples with results, over every job.",
                                  value=sum(j.samples_done for j in jobs))

    def _messages(self) -> Iterator[Metric]:
        stats = dict(self.fleet.stats)  # one C-level copy: the engine thread may add keys meanwhile
        received = CounterMetricFamily("edgesdk_fleet_messages_received", "Device messages the engine processed, by kind.",
                                       labels=["kind"])
        sent = CounterMetricFamily("edgesdk_fleet_messages_sent", "Messages the fleet published, by channel.",
                                   labels=["channel"])
        events = CounterMetricFamily("edgesdk_fleet_engine_events",
                                     "Everything else the engine counts (Fleet.stats): drops and why, duplicates, "
                                     "chunks and task pieces sent, results accepted or rejected.", labels=["event"])
        for key, n in sorted(stats.items()):
            if key in _KINDS:
                received.add_metric([key], n)
            elif key.startswith(_SENT):
                sent.add_metric([key[len(_SENT):]], n)
            else:
                events.add_metric([key], n)
        yield received
        yield sent
        yield events


class FleetMetrics:
    """The registry ``/metrics`` renders: the collector, and the engine's batch histogram."""

    def __init__(self, fleet: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(fleet))
        self._batch_seconds = Histogram("edgesdk_fleet_engine_batch_seconds",
                                        "Time the engine took for one batch of messages: processing and commit.",
                                        buckets=_BATCH_BUCKETS, registry=self.registry)
        self._batch_messages = Counter("edgesdk_fleet_engine_batch_messages", "Messages in the engine's batches.",
                                       registry=self.registry)

    def observe_batch(self, seconds: float, messages: int) -> None:
        """The engine's ``on_batch`` callback: one committed batch of ``messages`` took ``seconds``."""
        self._batch_seconds.observe(seconds)
        self._batch_messages.inc(messages)
