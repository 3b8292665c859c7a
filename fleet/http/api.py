"""The REST endpoints under ``/api/v1``: a thin layer over :class:`fleet.Fleet`, as the CLI is.

Each endpoint calls the facade method the matching ``edgesdk fleet`` command calls, with the same
options (the same names, without the dashes) and the same defaults (those of the facade), and
answers with the same JSON as the command's ``--json``. Uploads (a bundle, a job's inputs) are
written to a temporary file and handed over as a path, as the CLI hands over the user's file.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Optional

import pydantic
from fastapi import APIRouter, Body, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from sdk import protocol as proto
from sdk.errors import ConfigError, DataError, JobError, NotFoundError

from ..desired import ConfigEntry
from ..jobs import JobSummary
from ..registry import DeviceInfo
from ..rollout import RolloutView
from .uploads import UploadLimits, saved_upload

__all__ = ["api_router", "ROLLOUTS_PATH", "JOBS_PATH"]

ROLLOUTS_PATH = "/api/v1/rollouts"
JOBS_PATH = "/api/v1/jobs"
_NPZ_MAGIC, _NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"


def _model_of(cls: type, exclude: tuple[str, ...] = ()) -> type[pydantic.BaseModel]:
    """A pydantic model with a dataclass's fields (the OpenAPI schema of its ``to_dict``)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], pydantic.Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)
    return pydantic.create_model(cls.__name__, **fields)


Device = _model_of(DeviceInfo)
ConfigEntryModel = _model_of(ConfigEntry)
ConfigRevision = pydantic.create_model("ConfigRevision", revision=(int, ...))
_SETTINGS = ("settings (sdk.protocol.CONFIG_FIELDS): tags {K: V}, threads, pool_size, heartbeat_interval, work_slots, "
             "models {NAME: VERSION} (pins)")
_KEYS = "settings to stop desiring (threads, tags.site, models.digits); none: the whole entry"
Rollout = _model_of(RolloutView)
Job = _model_of(JobSummary, exclude=("outputs",))


def _errors(*kinds: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": text} for status, text in
            {401: "no token, or the wrong one", 404: "no such rollout, job or device", 413: "the upload is over the limit",
             422: "the request cannot be carried out (the message says why)"}.items()
            if str(status) in kinds}


def api_router(fleet: Any, limits: UploadLimits) -> APIRouter:
    """The ``/api/v1`` routes around ``fleet`` (a started :class:`fleet.Fleet`)."""
    r = APIRouter(prefix="/api/v1")

    # --- devices ------------------------------------------------------------------------------
    @r.get("/devices", response_model=list[Device], tags=["devices"], summary="List devices")
    def list_devices(tag: list[str] = Query(default=[], description="K=V: only devices with this tag (repeatable)"),
                     online: Optional[bool] = Query(default=None, description="only online (true) or offline (false) devices")
                     ) -> list[dict[str, Any]]:
        """Devices: presence and since when, agent and runtime versions, delegates, models, tags, last
        heartbeat (``edgesdk fleet devices --json``)."""
        return [d.to_dict() for d in fleet.devices(tag or None) if online is None or d.online == online]

    @r.get("/devices/{device_id}", response_model=Device, tags=["devices"], summary="One device",
           responses=_errors("404"))
    def one_device(device_id: str) -> dict[str, Any]:
        for d in fleet.devices():
            if d.id == device_id:
                return d.to_dict()
        raise NotFoundError(f"no device {device_id!r}: list them with edgesdk fleet devices")

    # --- rollouts -----------------------------------------------------------------------------
    @r.post("/rollouts", response_model=Rollout, status_code=201, tags=["rollouts"], summary="Start a rollout",
            responses=_errors("413", "422"))
    def create_rollout(
        bundle: UploadFile = File(description="the signed .edgebundle"),
        to: list[str] = Form(default=[], description="K=V: target devices by tag (repeatable: all must match)"),
        devices: Optional[str] = Form(default=None, description="ID,ID: target these device ids"),
        canary: Optional[int] = Form(default=None, description="devices in the first stage"),
        batch_percent: Optional[float] = Form(default=None, description="later stages: this % of the rest"),
        max_per_minute: Optional[int] = Form(default=None, description="devices starting per minute at most"),
        timeout: Optional[float] = Form(default=None, description="seconds per device before TIMED_OUT"),
        max_failure_percent: Optional[float] = Form(default=None, description="abort above this failure %"),
        min_executed: Optional[int] = Form(default=None, description="devices finished before the abort rule applies"),
        max_latency_regression: Optional[float] = Form(
            default=None, description="a device whose p50 on the new version exceeds R x its p50 on the old one fails"),
    ) -> JSONResponse:
        """Roll the uploaded bundle out in stages (``edgesdk fleet deploy --no-wait``): checked (intact,
        signed) before anything is created. Follow it at ``/api/v1/rollouts/{id}``."""
        limits.check(bundle.size or 0, "bundle")
        options = {k: v for k, v in dict(canary=canary, batch_percent=batch_percent, max_per_minute=max_per_minute,
                                         timeout=timeout, max_failure_percent=max_failure_percent,
                                         min_executed=min_executed,
                                         max_latency_regression=max_latency_regression).items() if v is not None}
        targets = [d for d in devices.split(",") if d] if devices is not None else None
        with saved_upload(bundle.file, bundle.filename, "bundle.edgebundle", ".edgebundle") as path:
            rid = fleet.deploy(path, to=to or None, devices=targets, **options)
        return JSONResponse(fleet.rollout(rid).to_dict(), status_code=201, headers={"Location": f"{ROLLOUTS_PATH}/{rid}"})

    @r.get("/rollouts", response_model=list[Rollout], tags=["rollouts"], summary="List rollouts")
    def list_rollouts() -> list[dict[str, Any]]:
        """Rollouts, newest first, with per-state counts (``edgesdk fleet rollouts --json``)."""
        return [v.to_dict() for v in fleet.rollouts()]

    @r.get("/rollouts/{rollout_id}", response_model=Rollout, tags=["rollouts"], summary="One rollout",
           responses=_errors("404"))
    def one_rollout(rollout_id: str) -> dict[str, Any]:
        """State, per-state counts and every device with its stage, state and reason
        (``edgesdk fleet rollout ID --json``)."""
        return fleet.rollout(rollout_id).to_dict()

    @r.post("/rollouts/{rollout_id}/cancel", response_model=Rollout, status_code=202, tags=["rollouts"],
            summary="Cancel a rollout", responses=_errors("404", "422"))
    def cancel_rollout(rollout_id: str) -> dict[str, Any]:
        """Stop starting devices: queued ones are canceled, those installing finish."""
        fleet.cancel(rollout_id)
        return fleet.rollout(rollout_id).to_dict()

    @r.post("/rollouts/{rollout_id}/rollback", response_model=Rollout, status_code=202, tags=["rollouts"],
            summary="Roll a rollout back", responses=_errors("404", "422"))
    def rollback_rollout(rollout_id: str) -> dict[str, Any]:
        """Roll every device that took the rollout's version back to its previous one."""
        fleet.rollback(rollout_id)
        return fleet.rollout(rollout_id).to_dict()

    # --- desired configuration ------------------------------------------------------------------
    @r.get("/config", response_model=list[ConfigEntryModel], tags=["config"], summary="Desired configuration")
    def list_config() -> list[dict[str, Any]]:
        """Every desired-configuration entry, per tag and per device (``edgesdk fleet config show
        --json``); each device's merged desired configuration and drift are in ``/api/v1/devices``."""
        return [e.to_dict() for e in fleet.configs()]

    @r.put("/config/devices/{device_id}", response_model=ConfigRevision, tags=["config"],
           summary="Desire settings for a device", responses=_errors("422"))
    def set_device_config(device_id: str, settings: dict[str, Any] = Body(description=_SETTINGS)) -> dict[str, Any]:
        """Merge ``settings`` into the device's entry (``edgesdk fleet config set --device ID``)."""
        return {"revision": fleet.set_config(device=device_id, **settings)}

    @r.put("/config/tags/{tag}", response_model=ConfigRevision, tags=["config"],
           summary="Desire settings for every device with a tag", responses=_errors("422"))
    def set_tag_config(tag: str, settings: dict[str, Any] = Body(description=_SETTINGS)) -> dict[str, Any]:
        """Merge ``settings`` into the entry of ``tag`` (``K=V``; ``edgesdk fleet config set --tag K=V``)."""
        return {"revision": fleet.set_config(tag=tag, **settings)}

    @r.delete("/config/devices/{device_id}", response_model=ConfigRevision, tags=["config"],
              summary="Stop desiring settings for a device", responses=_errors("422"))
    def unset_device_config(device_id: str, key: list[str] = Query(default=[], description=_KEYS)) -> dict[str, Any]:
        return {"revision": fleet.unset_config(*key, device=device_id)}

    @r.delete("/config/tags/{tag}", response_model=ConfigRevision, tags=["config"],
              summary="Stop desiring settings for a tag", responses=_errors("422"))
    def unset_tag_config(tag: str, key: list[str] = Query(default=[], description=_KEYS)) -> dict[str, Any]:
        return {"revision": fleet.unset_config(*key, tag=tag)}

    # --- jobs -----------------------------------------------------------------------------------
    @r.post("/jobs", response_model=Job, status_code=201, tags=["jobs"], summary="Submit a batch job",
            responses=_errors("413", "422"))
    def create_job(
        model: str = Form(description="the model to run (devices with it active take the tasks)"),
        inputs: UploadFile = File(description="the samples: .npz (one array per model input, or x) or .npy"),
        to: list[str] = Form(default=[], description="K=V: only devices with this tag (repeatable)"),
        batch_size: Optional[int] = Form(default=None, description="samples per task"),
        lease: Optional[float] = Form(default=None, description="seconds a device holds a task before it is sent again"),
        max_attempts: Optional[int] = Form(default=None, description="dispatches of a task before it FAILED"),
    ) -> JSONResponse:
        """Split the uploaded samples into tasks for the devices (``edgesdk fleet run``): checked against
        the model's inputs when the fleet holds its bundle. Follow it at ``/api/v1/jobs/{id}``."""
        limits.check(inputs.size or 0, "input")
        if not proto.ID_PATTERN.fullmatch(model):
            raise ConfigError(f"model {model[:80]!r}: a model name is letters, digits, '.', '_' and '-'")
        head = inputs.file.read(len(_NPY_MAGIC))
        inputs.file.seek(0)
        suffix = ".npz" if head.startswith(_NPZ_MAGIC) else ".npy" if head.startswith(_NPY_MAGIC) else None
        if suffix is None:
            raise DataError("the job's input file is neither .npz nor .npy: save the samples with numpy "
                            "(np.savez(path, x=samples) or np.save) and upload that")
        options = {k: v for k, v in dict(batch_size=batch_size, lease_s=lease, max_attempts=max_attempts).items()
                   if v is not None}
        with saved_upload(inputs.file, inputs.filename, f"inputs{suffix}", suffix) as path:
            job_id = fleet.submit(model, path, to=to or None, **options)
        return JSONResponse(fleet.job(job_id).to_dict(), status_code=201, headers={"Location": f"{JOBS_PATH}/{job_id}"})

    @r.get("/jobs", response_model=list[Job], tags=["jobs"], summary="List jobs")
    def list_jobs() -> list[dict[str, Any]]:
        """Batch jobs, newest first (``edgesdk fleet jobs --json``)."""
        return [j.to_dict() for j in fleet.jobs_list()]

    @r.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], summary="A job's progress", responses=_errors("404"))
    def one_job(job_id: str) -> dict[str, Any]:
        """Tasks per state, samples done, samples/s, each device's share (``edgesdk fleet job ID --json``)."""
        return fleet.job(job_id).to_dict()

    @r.get("/jobs/{job_id}/results", tags=["jobs"], summary="A job's results (.npz)", response_class=FileResponse,
           responses={200: {"content": {"application/octet-stream": {}}, "description": "the results, in input order"},
                      **_errors("404", "422")})
    def job_results(job_id: str) -> FileResponse:
        """The results in input order, as ``edgesdk fleet run -o results.npz`` writes them (``y``
        for one output, else the outputs' names); only once the job SUCCEEDED."""
        job = fleet.job(job_id)
        if job.state != "SUCCEEDED":
            raise JobError(f"job {job_id} is {job.state}: its results are complete once it SUCCEEDED "
                           f"(follow it at {JOBS_PATH}/{job_id})")
        folder = tempfile.mkdtemp(prefix="edgesdk-results-")
        try:
            path = fleet.write_outputs(job_id, Path(folder) / "results.npz", "npz")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}-results.npz",
                            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))

    return r
