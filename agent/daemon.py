"""``Agent``: the on-device daemon — serves models, installs bundles, rolls back.

In-process use::

    agent = Agent(load_config("agent.toml"))
    agent.start()                       # loads active models, opens the local API (and metrics)
    agent.install("digits-2.edgebundle")
    probs, = agent.predict("digits", [image])
    agent.rollback("digits")
    agent.stop()

An operator's own bundle (``edgesdk agent deploy``) goes through :meth:`Agent.sideload`: the same
install, with its outcome reported to the fleet without a rollout. :meth:`Agent.status` (and
:func:`stored_status` for a stopped agent) is what ``edgesdk agent status`` shows.

Swaps are atomic for callers: a request holds the :class:`ActiveModel` it started on, so
requests in flight finish on the old version while new ones go to the new one.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

import sdk
from sdk import protocol as proto
from sdk.bundle import Bundle
from sdk.device import pin_refusal
from sdk.errors import BackpressureError, BrokerError, EdgeSdkError, InferenceError, InstallError, ProtocolError
from sdk.runtime import DelegateOptions, Runtime, available_delegates, find_runtime
from sdk.signing import load_public_keys

from .config import AgentConfig
from .desired import SETTINGS as DESIRED_SETTINGS
from .desired import DesiredState
from .installer import PreparedInstall, compare_latency, prepare_install
from .localapi import LocalApiServer
from .metrics import MetricsServer, prometheus_text
from .outbox import Outbox, outbox_path, pending_in
from .serving import ActiveModel, Inputs
from .store import SPARE_BYTES, ModelStore

log = logging.getLogger("edgesdk.agent")

__all__ = ["Agent", "stored_status"]


class Agent:
    def __init__(self, config: AgentConfig, *, runtime: Optional[Runtime] = None) -> None:
        self.config = config
        self.runtime = runtime or find_runtime(allow_tensorflow=False)
        self.store = ModelStore(config.state_dir)
        if not config.trusted_keys:
            log.warning("no trusted_keys configured: every bundle will be refused")
        self.trusted = load_public_keys(config.trusted_keys)
        #: the fleet's desired configuration, kept in the state dir (agent.desired): its settings
        #: take the place of the file's from the start, before any model loads
        self.desired = DesiredState.load(config.state_dir, config)
        for key in DESIRED_SETTINGS:
            setattr(config, key, self.desired.effective(key))
        self.options = DelegateOptions(
            num_threads=config.threads,
            gpu_delegate_path=config.gpu_delegate_path or None,
            edgetpu_device=config.edgetpu_device or None,
        )
        self._models: dict[str, ActiveModel] = {}
        self._lock = threading.RLock()  # guards swaps and installs
        self._install_lock = threading.Lock()
        self._local: Optional[LocalApiServer] = None
        self._metrics: Optional[MetricsServer] = None
        self.started_at = time.time()
        self.result_sink: Optional[Callable[[str, list[np.ndarray], str], Any]] = None
        #: messages dropped per channel (undecodable, hostile, or for nothing running); the link counts
        #: into it, the metrics endpoint shows it
        self.dropped: collections.Counter[str] = collections.Counter()
        self._dropped_lock = threading.Lock()
        #: the running fleet link (:class:`agent.link.AgentLink` sets itself here): what status shows of
        #: the broker and the outbox, and where sideloads are reported; None without one
        self.link: Optional[Any] = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, *, local_api: bool = True) -> "Agent":
        self.load_active()
        self.desired.apply(self)  # models pinned to a version
        if local_api:
            self._local = LocalApiServer(self.config.socket_path, self.predict, self.models, self._rollback_summary,
                                         model=self.model, max_connections=self.config.local_api_max_connections,
                                         deploy=self.sideload, status=self.status,
                                         max_deploy_bytes=self.config.max_bundle_bytes)
            self._local.start()
        if self.config.metrics_port:
            self._metrics = MetricsServer(self.config.metrics_port, self.metrics_text)
            self._metrics.start()
        return self

    def stop(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None

    def load_active(self) -> None:
        """Load every model's active version from the store (after a restart, say)."""
        for name in self.store.names():
            for version in (self.store.active(name), self.store.previous(name)):
                if not version:
                    continue
                try:
                    prepared = self._prepare(self.store.bundle_path(name, version).read_bytes(), f"{name}@{version}")
                except (OSError, EdgeSdkError) as exc:
                    log.error("cannot load %s@%s from the store: %s", name, version, exc)
                    continue
                with self._lock:
                    self._models[name] = prepared.model
                if version != self.store.active(name):
                    self.store.activate(name, version, previous=None)
                    log.warning("%s: active version failed to load, serving %s", name, version)
                break

    # --- serving -----------------------------------------------------------------------------
    def model(self, name: str) -> ActiveModel:
        m = self._models.get(name)
        if m is None:
            active = ", ".join(sorted(self._models)) or "none"
            raise InferenceError(f"no model named {name!r} is active (active: {active})")
        return m

    def predict(self, name: str, inputs: Inputs, *, raw: bool = False, publish_key: Optional[str] = None,
                reply: Optional[Callable[[list[np.ndarray]], None]] = None,
                quant: Sequence[Optional[Sequence[float]]] = ()) -> list[np.ndarray]:
        """Run one request on the active version of ``name``; with ``publish_key`` also send the
        result to the fleet durably (needs a running link; raises BackpressureError when full).
        ``reply`` (the local API's) gets the outputs before the bookkeeping; when publishing,
        only once the outbox has taken the result. ``quant``: see :meth:`ActiveModel.predict`."""
        if publish_key is None:
            return self.model(name).predict(inputs, raw=raw, reply=reply, quant=quant)
        if self.result_sink is None:
            raise InferenceError("publishing results needs the MQTT link (edgesdk agent run)")
        outputs = self.model(name).predict(inputs, raw=raw)
        self.result_sink(name, outputs, publish_key)
        if reply is not None:
            reply(outputs)
        return outputs

    def active_versions(self) -> dict[str, str]:
        """``{name: version}`` of the models being served (cheap: no statistics are computed)."""
        with self._lock:
            return {name: m.version for name, m in self._models.items()}

    def models(self) -> list[dict[str, Any]]:
        with self._lock:
            loaded = dict(self._models)
        out = []
        for name in sorted(set(loaded) | set(self.store.names())):
            m = loaded.get(name)
            out.append({
                "name": name,
                "active": m.version if m else None,
                "previous": self.store.previous(name),
                "stored": self.store.versions(name),
                "delegate": m.delegate if m else None,
                "inputs": [str(t.get("key") or t.get("name")) for t in m.manifest.get("inputs", [])] if m else [],
                "outputs": [str(t.get("key") or t.get("name")) for t in m.manifest.get("outputs", [])] if m else [],
                "input_specs": [dict(t) for t in m.manifest.get("inputs", [])] if m else [],
                "stats": m.stats.summary() if m else None,
            })
        return out

    def count_dropped(self, channel: str) -> None:
        """Count one message dropped on ``channel`` (thread-safe)."""
        with self._dropped_lock:
            self.dropped[channel] += 1

    def metrics_text(self) -> str:
        with self._lock:
            loaded = dict(self._models)
        with self._dropped_lock:
            dropped = dict(self.dropped)
        return prometheus_text({n: (m.version, m.stats) for n, m in loaded.items()}, dropped)

    # --- installs ------------------------------------------------------------------------------
    def _prepare(self, raw: bytes, source: str) -> PreparedInstall:
        return prepare_install(raw, self.trusted, self.runtime, delegate=self.config.delegate, options=self.options,
                               pool_size=self.config.pool_size, source=source)

    def install(self, bundle: Union[bytes, str, os.PathLike], *, expected: Optional[tuple[str, str]] = None,
                origin: str = "local") -> dict[str, Any]:
        """Verify, load, health-check and activate a bundle; on any failure the old model stays.
        ``expected``: the ``(name, version)`` a command announced; a bundle that is another one is refused.
        ``origin`` (``fleet``, ``sideload``, ``local``) goes into the last install's record."""
        if isinstance(bundle, (str, os.PathLike)):
            try:
                raw, source = Path(bundle).read_bytes(), str(bundle)
            except OSError as exc:
                raise InstallError(f"cannot read bundle {bundle}: {exc.strerror or exc}") from exc
        else:
            raw, source = bytes(bundle), "<bundle>"
        return self._install_recorded(raw, source, expected, origin)

    def _install_recorded(self, raw: bytes, source: str, expected: Optional[tuple[str, str]],
                          origin: str) -> dict[str, Any]:
        """:meth:`_install`, its outcome kept as the last install (what ``agent status`` shows)."""
        try:
            result = self._install(raw, source, expected)
        except EdgeSdkError as exc:
            self._record_install("FAILED", *_declared(raw), str(exc), origin)
            raise
        self._record_install("SUCCEEDED", result["model"], result["version"], "", origin, result["previous"])
        return result

    def _install(self, raw: bytes, source: str, expected: Optional[tuple[str, str]]) -> dict[str, Any]:
        with self._install_lock:
            prepared = self._prepare(raw, source)
            name, version = prepared.name, prepared.version
            refusal = pin_refusal(name, version, self.desired.pins)
            if refusal is not None:
                raise InstallError(refusal)
            if expected is not None and (name, version) != tuple(expected):
                raise InstallError(f"the bundle is {name}@{version}, the install command named "
                                   f"{expected[0]}@{expected[1]}: refused (check the rollout's model and version)")
            previous = self.store.active(name)
            summary = prepared.summary()
            old = self._models.get(name)
            if old is not None and old.version != version:
                try:
                    summary["p50_ms"], summary["previous_p50_ms"] = compare_latency(prepared.model, old)
                except Exception as exc:  # a comparison failure must not block an install
                    log.warning("could not compare latency with %s@%s: %s", name, old.version, exc)
            self._ensure_disk(len(raw))
            self.store.stage(name, version, raw)
            self.store.activate(name, version)
            with self._lock:
                self._models[name] = prepared.model  # the swap: new requests see the new model
        log.info("installed %s@%s (previous %s) on %s", name, version, previous, prepared.model.delegate)
        return {**summary, "previous": previous}

    def _record_install(self, outcome: str, model: str, version: str, reason: str, origin: str,
                        previous: Optional[str] = None) -> None:
        record = {"model": model, "version": version, "outcome": outcome, "reason": reason, "origin": origin,
                  "previous": previous, "at": time.time()}
        try:
            self.store.record_install(record)
        except OSError as exc:  # the install itself is done (or refused): a record it cannot keep is only logged
            log.warning("could not record the last install (%s@%s %s): %s", model, version, outcome, exc)

    def sideload(self, bundle: bytes, source: str = "<bundle>") -> dict[str, Any]:
        """Install a bundle an operator brought to the device (``edgesdk agent deploy``): the very
        install a fleet update gets (:meth:`install`). Its outcome, a refusal too, is reported to
        the fleet as an install status without a rollout, through the durable outbox: sent at once
        by a running link, else when the agent next reaches the fleet. ``result["reported"]`` says
        which."""
        raw = bytes(bundle)
        source = "".join(c for c in source if c.isprintable())[:128] or "<bundle>"  # for messages only
        try:
            result = self._install_recorded(raw, source, None, "sideload")
        except EdgeSdkError as exc:
            model, version = _declared(raw)
            self._report_sideload("FAILED", model, version, f"sideload refused: {exc}")
            raise
        result["reported"] = self._report_sideload(
            "SUCCEEDED", result["model"], result["version"], "sideloaded on the device", result["previous"],
            result["p50_ms"], result.get("previous_p50_ms"), bundle_sha256=hashlib.sha256(raw).hexdigest())
        return result

    def _report_sideload(self, state: str, model: str, version: str, reason: str, previous: Optional[str] = None,
                         p50_ms: Optional[float] = None, previous_p50_ms: Optional[float] = None,
                         bundle_sha256: Optional[str] = None) -> str:
        """Queue an install status for the fleet (through the link when one runs, else straight into
        the outbox file); returns what became of it, in words."""
        try:
            status = proto.InstallStatus(device=self.config.device_id, model=model, version=version, state=state,
                                         reason=proto.clip_text(reason), previous_version=previous, p50_ms=p50_ms,
                                         previous_p50_ms=previous_p50_ms, bundle_sha256=bundle_sha256)
            link = self.link
            if link is not None:
                link.report_install(status)
                return "reported to the fleet"
            outbox = Outbox(outbox_path(self.config.state_dir), self.config.outbox_max)
            try:
                outbox.put(status.id, proto.topic(self.config.device_id, "up"), status.to_payload())
            finally:
                outbox.close()
        except (BackpressureError, BrokerError, ProtocolError) as exc:  # a full outbox; a bundle naming no model
            log.warning("install status %s of %s@%s not queued for the fleet: %s", state, model, version, exc)
            return f"not reported to the fleet: {exc}"
        return "queued for the fleet (sent when the agent next reaches it)"

    def rollback(self, name: str, to_version: Optional[str] = None) -> dict[str, Any]:
        """Reactivate the previous (or a given stored) version of ``name``."""
        with self._install_lock:
            stored = self.store.versions(name)  # InstallError for a name that cannot be one
            current = self.store.active(name)
            if not stored:
                models = ", ".join(self.store.names()) or "none"
                raise InstallError(f"no model named {name!r} on this device (models: {models})")
            target = to_version or self.store.previous(name)
            if not target:
                raise InstallError(f"{name} has no previous version to roll back to (stored: {', '.join(stored)})")
            if target not in stored:
                raise InstallError(f"{name}@{target} is not stored on this device (stored: {', '.join(stored)}): "
                                   f"roll back to one of those, or install {name}@{target}")
            try:
                raw = self.store.bundle_path(name, target).read_bytes()
            except OSError as exc:
                raise InstallError(f"{name}@{target} is not in the store: {exc.strerror or exc}") from exc
            prepared = self._prepare(raw, f"{name}@{target}")
            self.store.activate(name, target, previous=current)
            with self._lock:
                self._models[name] = prepared.model
        log.info("rolled %s back from %s to %s", name, current, target)
        return {**prepared.summary(), "previous": current}

    def reload_models(self) -> None:
        """Load every active model again with the current threads and pool size and swap each in
        as an install does (requests go on meanwhile); the first failure is raised, the models
        before it swapped, the others left as they were."""
        with self._install_lock:
            for name, version in sorted(self.active_versions().items()):
                prepared = self._prepare(self.store.bundle_path(name, version).read_bytes(), f"{name}@{version}")
                with self._lock:
                    self._models[name] = prepared.model

    def apply_config(self, cmd: "proto.ConfigCommand") -> str:
        """Apply and keep the fleet's desired configuration (see :mod:`agent.desired`); returns the
        note of what could not be applied. A command older than the one applied changes nothing."""
        if cmd.revision <= self.desired.revision:
            return self.desired.note
        self.desired.accept(cmd)
        note = self.desired.apply(self)
        log.info("desired configuration revision %d applied%s", cmd.revision, f" ({note})" if note else "")
        return note

    def _rollback_summary(self, name: str) -> dict[str, Any]:
        return self.rollback(name)

    def _ensure_disk(self, needed: int) -> None:
        """The store writes the bundle once (temp file, then renamed) and keeps SPARE_BYTES free."""
        free = shutil.disk_usage(self.store.root).free
        if free < needed + SPARE_BYTES:
            raise InstallError(f"not enough disk: {free} bytes free under {self.store.root}, need {needed + SPARE_BYTES} "
                               f"({needed} for the bundle, {SPARE_BYTES} spare): free up space on the device")

    def delegates(self) -> list[str]:
        return available_delegates(self.options)

    def status(self) -> dict[str, Any]:
        """What ``edgesdk agent status`` shows of a running agent: its models and versions, its broker
        link, its outbox depth and the last install."""
        link = self.link
        out = _status_base(self.config, self.store)
        out.update(running=True, pid=os.getpid(), uptime_s=time.time() - self.started_at,
                   models=[{k: m[k] for k in ("name", "active", "previous", "stored", "delegate")}
                           for m in self.models()])
        out["link"]["enabled"] = link is not None  # None is for a stopped agent: not known
        if link is not None:
            described = link.describe()
            out["link"]["connected"] = described["connected"]
            out["outbox"]["pending"] = described["outbox_pending"]
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.config.device_id,
            "agent_version": sdk.__version__,
            "runtime": self.runtime.describe(),
            "models": self.active_versions(),
            "tags": dict(self.config.tags),
            "free_disk_bytes": shutil.disk_usage(self.store.root).free,
            "config": self.desired.reported(self),
            "config_revision": self.desired.revision,
            "config_note": self.desired.note,
        }


def _declared(raw: bytes) -> tuple[str, str]:
    """The model and version a bundle's manifest names, unverified (for the report of a refused
    install); ``("", "")`` when it has no readable manifest."""
    try:
        manifest = Bundle(raw).manifest
    except EdgeSdkError:
        return "", ""
    return manifest.name, manifest.version


def _status_base(config: AgentConfig, store: Optional[ModelStore]) -> dict[str, Any]:
    """The part of the status a stopped agent's files tell as well as a running agent."""
    return {
        "device": config.device_id, "agent_version": sdk.__version__, "state_dir": str(config.state_dir),
        "socket": str(config.socket_path), "running": False,
        "link": {"broker": config.broker_url, "enabled": None, "connected": False},
        "outbox": {"pending": pending_in(outbox_path(config.state_dir)), "max": config.outbox_max},
        "last_install": store.last_install() if store is not None else None,
    }


def stored_status(config: AgentConfig) -> dict[str, Any]:
    """The status of an agent that is not running, read from its state dir (nothing is created)."""
    store = ModelStore(config.state_dir) if (config.state_dir / "models").is_dir() else None
    out = _status_base(config, store)
    out["models"] = [{"name": name, "active": store.active(name), "previous": store.previous(name),
                      "stored": store.versions(name), "delegate": None} for name in store.names()] if store else []
    return out
