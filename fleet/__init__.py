"""edgesdk's fleet: device registry, staged rollouts with automatic rollback, and distributed
batch inference over MQTT (``pip install 'edgesdk[fleet]'``; no TensorFlow, no LiteRT).

* :class:`Fleet` — the controller (registry, rollouts, jobs); see :mod:`fleet.service`.
* :class:`SimulatedDevices` — many lightweight simulated agents in one process, for tests and
  benchmarks at fleet scale; see :mod:`fleet.sim`.
"""

from .jobs import JobOptions, JobSummary
from .registry import DeviceInfo
from .rollout import RolloutOptions, RolloutView
from .service import Fleet
from .sim import SimulatedDevices

__all__ = ["Fleet", "SimulatedDevices", "DeviceInfo", "RolloutOptions", "RolloutView", "JobOptions", "JobSummary"]
