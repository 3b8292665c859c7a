"""``edgesdk fleet ...``: devices, rollouts and batch jobs, a thin layer over :class:`fleet.Fleet`.

Commands that need work done (``deploy``, ``rollout --watch``, ``rollback``, ``run``, ``job
resume``) drive it themselves when no controller (``edgesdk fleet serve``) leads, and otherwise
write their request to the fleet's database and watch the leading controller do it, on this
machine or another: with ``--db postgresql://...`` every command works from any machine that
reaches the database.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from sdk.errors import FleetError

__all__ = ["fleet_group"]


def _fleet(ctx: click.Context, **kw: Any) -> Any:
    from .service import Fleet

    o = ctx.obj["fleet_options"]
    return Fleet(o["state"], o["broker"], db=o["db"], username=o["username"], password=o["password"],
                 ca_file=o["ca_file"], client_cert=o["client_cert"], client_key=o["client_key"], protocol=o["protocol"],
                 max_packet_size=o["max_packet_size"], **kw)


@contextmanager
def _driving(ctx: click.Context) -> Iterator[Any]:
    """A Fleet whose work gets done: this process stands for leadership for as long as the
    command runs, so it does the work when no other controller leads, watches the one that leads
    otherwise, and takes over if that one dies meanwhile."""
    fleet = _fleet(ctx)
    if fleet.controller_elsewhere():
        click.echo(f"(a fleet controller leads {fleet.storage.describe()}; watching it work)", err=True)
        fleet.start(standby=True)
    else:
        try:
            fleet.start()
        except FleetError:  # another one took the lead a moment ago
            fleet.start(standby=True)
    try:
        yield fleet
    finally:
        fleet.stop()


@click.group("fleet")
@click.option("--state", type=click.Path(file_okay=False), envvar="EDGESDK_FLEET_STATE", default=None,
              help="Fleet state directory [env EDGESDK_FLEET_STATE; default ~/.local/share/edgesdk/fleet].")
@click.option("--db", envvar="EDGESDK_FLEET_DB", default=None, metavar="URL",
              help="Fleet database: postgresql://USER@HOST:PORT/DB, or a SQLite file [env EDGESDK_FLEET_DB; "
                   "default STATE/fleet.sqlite].")
@click.option("--broker", envvar="EDGESDK_FLEET_BROKER", default="mqtt://127.0.0.1:1883", show_default=True,
              help="MQTT broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT [env EDGESDK_FLEET_BROKER].")
@click.option("--username", envvar="EDGESDK_FLEET_USERNAME", default="", help="Broker username.")
@click.option("--password", envvar="EDGESDK_FLEET_PASSWORD", default="", help="Broker password [env EDGESDK_FLEET_PASSWORD].")
@click.option("--ca-file", envvar="EDGESDK_FLEET_CA_FILE", default="", help="CA certificate (PEM) for mqtts://.")
@click.option("--client-cert", envvar="EDGESDK_FLEET_CLIENT_CERT", default="", help="Client certificate (PEM), mutual TLS.")
@click.option("--client-key", envvar="EDGESDK_FLEET_CLIENT_KEY", default="", help="Client key (PEM), mutual TLS.")
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
              help="MQTT protocol version (auto: 5, else 3.1.1).")
@click.option("--max-packet-size", type=int, default=256 * 1024, show_default=True,
              help="Largest MQTT message the fleet sends (the broker's own limit applies when it announces one).")
@click.pass_context
def fleet_group(ctx: click.Context, **options: Any) -> None:
    """The fleet: device registry, staged rollouts, distributed batch inference."""
    ctx.ensure_object(dict)
    ctx.obj["fleet_options"] = options


# --- serve -------------------------------------------------------------------------------------
@fleet_group.command("serve")
@click.option("--lease", "lease_s", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
              help="Seconds of the controller lease (PostgreSQL): a standby takes over within this after the leader dies.")
@click.option("--http", "http", default=None, metavar="HOST:PORT",
              help="Also serve the REST API (/api/v1), the dashboard (/) and /metrics here (port 0: a free one).")
@click.option("--api-token-file", type=click.Path(dir_okay=False), envvar="EDGESDK_FLEET_API_TOKEN_FILE", default=None,
              help="File holding the bearer token the HTTP API requires (needed unless HOST is a loopback address).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="Serve HTTPS: certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Serve HTTPS: its private key (PEM).")
@click.option("--max-bundle-mb", type=click.FloatRange(min=0, min_open=True), default=256.0, show_default=True,
              help="Largest bundle the HTTP API accepts.")
@click.option("--max-input-mb", type=click.FloatRange(min=0, min_open=True), default=256.0, show_default=True,
              help="Largest job input file the HTTP API accepts.")
@click.pass_context
def serve_command(ctx: click.Context, lease_s: float, http: Optional[str], api_token_file: Optional[str],
                  tls_cert: Optional[str], tls_key: Optional[str], max_bundle_mb: float, max_input_mb: float) -> None:
    """Run a fleet controller in the foreground until SIGTERM/SIGINT.

    Several may run on one database: one leads, the others stand by and take over when it dies
    (with PostgreSQL, within the lease period). With --http, the same process serves the REST
    API, the live dashboard and Prometheus metrics (see the README's "HTTP API")."""
    server, token = None, None
    if http:
        from .http import ApiServer, parse_listen, read_token

        token = read_token(api_token_file) if api_token_file else None
        server = ApiServer(*parse_listen(http), token_required=token is not None, tls_cert=tls_cert, tls_key=tls_key)
    elif api_token_file or tls_cert or tls_key:
        raise click.UsageError("--api-token-file, --tls-cert and --tls-key go with --http HOST:PORT")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet = None
    try:
        fleet = _fleet(ctx, lease_s=lease_s).start(standby=True)
        where = f"broker {fleet.settings.host}:{fleet.settings.port}, state {fleet.storage.describe()}"
        click.echo(f"fleet controller started ({where}); it leads when no other controller does", err=True)
        if server is not None:
            from .http import MIB, UploadLimits, create_app

            limits = UploadLimits(int(max_bundle_mb * MIB), int(max_input_mb * MIB))
            server.start(create_app(fleet, token=token, limits=limits))
            click.echo(f"HTTP API on {server.url}/api/v1, dashboard at {server.url}/, metrics at {server.url}/metrics"
                       + ("" if token else " (no token: loopback only)"), err=True)
        leading = False
        while not stop.wait(0.5):
            if fleet.leading != leading:
                leading = fleet.leading
                click.echo("fleet controller: leading" if leading else "fleet controller: standing by", err=True)
    finally:
        if server is not None:
            server.stop()
        if fleet is not None:
            fleet.stop()


# --- devices -----------------------------------------------------------------------------------
def _ago(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


@fleet_group.command("devices")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Only devices with this tag (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def devices_command(ctx: click.Context, tags: tuple[str, ...], as_json: bool) -> None:
    """Devices: online/offline and since when, versions, delegates, models, tags, last heartbeat."""
    from sdk.cli import echo_json

    fleet = _fleet(ctx)
    fleet.refresh_registry()
    devices = fleet.devices(list(tags))
    if as_json:
        echo_json([d.to_dict() for d in devices])
        return
    if not devices:
        click.echo("no devices known yet (agents announce themselves when they connect)")
        return
    click.echo(f"{'DEVICE':<18} {'STATE':<14} {'AGENT':<10} {'RUNTIME':<22} {'DELEGATES':<12} {'MODELS':<20} "
               f"{'P50 ms':>7} {'REQ':>6} {'ERR':>4} {'CONFIG':<8}  TAGS")
    for d in devices:
        state = f"{'online' if d.online else 'offline'} {_ago(d.since)}"
        rt = f"{d.runtime.get('name', '?')} {d.runtime.get('version', '')}".strip()
        models = ",".join(f"{k}@{v}" for k, v in sorted(d.models.items())) or "-"
        hb = next(iter(d.heartbeat.values()), {}) if d.heartbeat else {}
        p50 = f"{hb['p50_ms']:.3f}" if hb.get("count") else "-"  # no request since the model was loaded
        click.echo(f"{d.id:<18} {state:<14} {d.agent_version:<10} {rt:<22} {','.join(d.delegates):<12} {models:<20} "
                   f"{p50:>7} {hb.get('requests', '-')!s:>6} {hb.get('errors', '-')!s:>4} {d.config_state:<8}  "
                   f"{','.join(f'{k}={v}' for k, v in sorted(d.tags.items()))}")
    drifting = [d for d in devices if d.config_state in ("drift", "pending")]
    for d in drifting:  # where what a device runs differs from what is desired
        what = ", ".join(f"{k} {v['reported']!r} (desired {v['desired']!r})" for k, v in sorted(d.drift.items()))
        note = f"; {d.config_note}" if d.config_note else ""
        click.echo(f"  {d.id}: {d.config_state}: {what or 'revision ' + str(d.desired_revision) + ' not applied yet'}"
                   f"{note}")


# --- desired configuration -----------------------------------------------------------------------------
@fleet_group.group("config")
def config_group() -> None:
    """Desired configuration per device and per tag: tags, threads, pool_size, heartbeat_interval,
    work_slots, and models pinned to a version (models.NAME=VERSION). The leading controller sends
    it; agents apply it without a restart and report what they run (`fleet devices` shows drift)."""


def _whose(device: Optional[str], tag: Optional[str]) -> dict[str, Optional[str]]:
    return {"device": device, "tag": tag}


@config_group.command("set")
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--device", default=None, help="One device.")
@click.option("--tag", default=None, metavar="K=V", help="Every device with this tag.")
@click.pass_context
def config_set_command(ctx: click.Context, settings: tuple[str, ...], device: Optional[str], tag: Optional[str]) -> None:
    """Desire settings for a device or a tag (threads=2 tags.site=berlin models.digits=3)."""
    from .desired import parse_settings

    revision = _fleet(ctx).set_config(**_whose(device, tag), **parse_settings(settings))
    click.echo(f"desired configuration revision {revision}")


@config_group.command("unset")
@click.argument("keys", nargs=-1, metavar="KEY...")
@click.option("--device", default=None, help="One device.")
@click.option("--tag", default=None, metavar="K=V", help="Every device with this tag.")
@click.pass_context
def config_unset_command(ctx: click.Context, keys: tuple[str, ...], device: Optional[str], tag: Optional[str]) -> None:
    """Stop desiring settings (`threads`, `tags.site`, `models.digits`); no KEY: all of that entry."""
    revision = _fleet(ctx).unset_config(*keys, **_whose(device, tag))
    click.echo(f"desired configuration revision {revision}")


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def config_show_command(ctx: click.Context, as_json: bool) -> None:
    """Every desired-configuration entry, per tag and per device."""
    from sdk.cli import echo_json

    entries = _fleet(ctx).configs()
    if as_json:
        echo_json([e.to_dict() for e in entries])
        return
    if not entries:
        click.echo("no desired configuration (edgesdk fleet config set --device ID | --tag K=V KEY=VALUE...)")
    for e in entries:
        shown = " ".join(f"{k}={v}" for k, v in sorted(e.config.items())) or "(removed)"
        click.echo(f"{e.scope:<6} {e.target:<24} revision {e.revision:<5} {shown}")


# --- rollouts ------------------------------------------------------------------------------------
def _render_rollout(view: Any, width: int = 30) -> list[str]:
    total = max(1, sum(view.counts.values()))
    lines = [f"rollout {view.id}: {view.model}@{view.version} {view.state}" + (f" ({view.reason})" if view.reason else "")]
    for state, n in view.counts.items():
        filled = round(width * n / total)
        lines.append(f"  {state:<12} [{'#' * filled}{'.' * (width - filled)}] {n}/{total}")
    return lines


def _watch_rollout(fleet: Any, rollout_id: str, as_json: bool) -> Any:
    tty = sys.stdout.isatty() and not as_json
    shown: list[str] = []

    def progress(view: Any) -> None:
        nonlocal shown
        lines = _render_rollout(view)
        if lines == shown or as_json:
            return
        if tty and shown:
            click.echo(f"\x1b[{len(shown)}F\x1b[J", nl=False)
        if tty or not shown or view.done:
            click.echo("\n".join(lines))
        else:
            click.echo(lines[0] + "  " + " ".join(f"{k}={v}" for k, v in view.counts.items() if v))
        shown = lines

    return fleet.wait_rollout(rollout_id, on_progress=progress)


def _rollout_outcome(view: Any, as_json: bool) -> None:
    from sdk.cli import echo_json
    from sdk.errors import RolloutError

    if as_json:
        echo_json(view.to_dict())
    else:
        for d in view.devices:
            if d["state"] != "SUCCEEDED" or d["reason"]:
                click.echo(f"  {d['device']}: {d['state']} {d['reason']}")
    if view.state in ("ABORTED", "FAILED"):
        raise RolloutError(f"rollout {view.id} {view.state.lower()}: {view.reason}")


@fleet_group.command("deploy")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "to", multiple=True, metavar="K=V", help="Target devices by tag (repeatable: all must match).")
@click.option("--devices", "device_ids", default=None, metavar="ID,ID", help="Target these device ids.")
@click.option("--canary", type=int, default=1, show_default=True, help="Devices in the first stage.")
@click.option("--batch-percent", type=float, default=50.0, show_default=True, help="Later stages: this % of the rest.")
@click.option("--max-per-minute", type=int, default=60, show_default=True, help="Devices starting per minute at most.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per device before TIMED_OUT.")
@click.option("--max-failure-percent", type=float, default=10.0, show_default=True, help="Abort above this failure %.")
@click.option("--min-executed", type=int, default=1, show_default=True, help="Devices finished before the abort rule applies.")
@click.option("--max-latency-regression", type=float, default=None,
              help="A device whose p50 on the new version exceeds R x its p50 on the old one counts as failed.")
@click.option("--no-wait", is_flag=True, help="Create the rollout and return (a running `fleet serve` carries it out).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_context
def deploy_command(ctx: click.Context, bundle: str, to: tuple[str, ...], device_ids: Optional[str], no_wait: bool,
                   as_json: bool, **options: Any) -> None:
    """Roll BUNDLE out in stages (canary, then batches) with abort thresholds and rollback."""
    from sdk.cli import echo_json

    fleet = _fleet(ctx)
    targets = [d for d in device_ids.split(",") if d] if device_ids is not None else None
    if targets is None:
        fleet.refresh_registry()  # targets by tag come from the registry: make it current
    rollout_id = fleet.deploy(bundle, to=list(to) if to else None, devices=targets, **options)
    if no_wait:
        if as_json:
            echo_json({"rollout": rollout_id})
        else:
            click.echo(f"rollout {rollout_id} created; follow it with edgesdk fleet rollout {rollout_id} --watch")
        return
    if not as_json:
        click.echo(f"rollout {rollout_id} created")
    with _driving(ctx) as fleet:
        view = _watch_rollout(fleet, rollout_id, as_json)
    _rollout_outcome(view, as_json)


@fleet_group.command("rollouts")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def rollouts_command(ctx: click.Context, as_json: bool) -> None:
    """List rollouts, newest first."""
    from sdk.cli import echo_json

    views = _fleet(ctx).rollouts()
    if as_json:
        echo_json([v.to_dict() for v in views])
        return
    for v in views:
        counts = " ".join(f"{k}={n}" for k, n in v.counts.items() if n)
        click.echo(f"{v.id}  {v.model}@{v.version:<8} {v.state:<12} {counts}  {v.reason}")


@fleet_group.command("rollout")
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Follow it until it finishes (drives it when no fleet process runs).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def rollout_command(ctx: click.Context, rollout_id: str, watch: bool, as_json: bool) -> None:
    """Show a rollout: state, per-state progress, every device with its reason."""
    from sdk.cli import echo_json

    fleet = _fleet(ctx)
    view = fleet.rollout(rollout_id)
    if watch and not view.done:
        with _driving(ctx) as fleet:
            view = _watch_rollout(fleet, rollout_id, as_json)
        _rollout_outcome(view, as_json)
        return
    if as_json:
        echo_json(view.to_dict())
        return
    click.echo("\n".join(_render_rollout(view)))
    for d in view.devices:
        p50 = f" p50 {d['p50_ms']:.3f} ms (was {d['previous_p50_ms']:.3f})" if d["p50_ms"] and d["previous_p50_ms"] else ""
        click.echo(f"  {d['device']:<18} stage {d['stage']}  {d['state']:<12}{p50} {d['reason']}")


@fleet_group.command("rollback")
@click.argument("rollout_id")
@click.option("--no-wait", is_flag=True, help="Request it and return.")
@click.pass_context
def rollback_command(ctx: click.Context, rollout_id: str, no_wait: bool) -> None:
    """Roll every device that took the rollout's version back to its previous one."""
    fleet = _fleet(ctx)
    fleet.rollback(rollout_id)
    if no_wait:
        click.echo(f"rollback of {rollout_id} requested")
        return
    with _driving(ctx) as fleet:
        view = _watch_rollout(fleet, rollout_id, False)
    click.echo(f"rollout {rollout_id}: {view.state}")


@fleet_group.command("cancel")
@click.argument("rollout_id")
@click.pass_context
def cancel_command(ctx: click.Context, rollout_id: str) -> None:
    """Stop a rollout: queued devices are canceled, devices already installing finish."""
    fleet = _fleet(ctx)
    fleet.cancel(rollout_id)
    with _driving(ctx) as fleet:
        view = fleet.wait_rollout(rollout_id)
    click.echo(f"rollout {rollout_id}: {view.state}")


# --- jobs ----------------------------------------------------------------------------------------------
def _job_lines(s: Any) -> list[str]:
    rate = f"{s.samples_per_s:,.0f} samples/s" if s.samples_per_s else "-"
    eff = f"{s.efficiency:.2f}" if s.efficiency is not None else "-"
    lines = [f"job {s.id}: {s.model} {s.state} {s.samples_done}/{s.samples} samples, {rate}, retries {s.retries}, "
             f"efficiency {eff}" + (f" ({s.reason})" if s.reason else "")]
    if getattr(s, "input_encoding", None):
        sent = f"{s.bytes_per_sample:,.1f} bytes sent per sample" if s.bytes_per_sample else "nothing sent yet"
        lines.append(f"  inputs: {', '.join(s.input_encoding)}; {s.input_bytes_per_sample:,} bytes per sample on the "
                     f"wire; {sent} ({s.bytes_sent:,} bytes in all); tasks of {s.task_samples} samples")
    for dev, d in s.devices.items():
        lines.append(f"  {dev:<18} {d['samples']:>7} samples ({100 * d['share']:5.1f} %)  {d['tasks']:>5} tasks  "
                     f"{d['throughput']:,.0f} samples/s busy")
    if s.output and s.state == "SUCCEEDED":
        lines.append(f"results: {s.output}")
    return lines


def _follow_job(fleet: Any, job_id: str, as_json: bool) -> Any:
    from sdk.cli import echo_json

    total = fleet.job(job_id).tasks
    with click.progressbar(length=total, label="tasks", file=sys.stderr, hidden=as_json) as bar:
        def progress(s: Any) -> None:
            done = s.counts.get("DONE", 0) + s.counts.get("FAILED", 0)
            if done > bar.pos:
                bar.update(done - bar.pos)

        result = fleet.finish_job(job_id, on_progress=progress)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo("\n".join(_job_lines(result)))
    return result


@fleet_group.command("run")
@click.argument("model")
@click.option("--input", "data", required=True, type=click.Path(exists=True),
              help="Inputs: .npz (x), .npy, or a folder of images.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Results file (input order).")
@click.option("--format", "fmt", type=click.Choice(["npz", "jsonl"]), default="npz", show_default=True)
@click.option("--to", "to", multiple=True, metavar="K=V", help="Only devices with this tag (repeatable).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per task.")
@click.option("--lease", "lease_s", type=float, default=60.0, show_default=True,
              help="Seconds a device holds a task before it is dispatched again.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def run_command(ctx: click.Context, model: str, data: str, output: str, fmt: str, to: tuple[str, ...], batch_size: int,
                lease_s: float, as_json: bool) -> None:
    """Run MODEL over DATA across the devices that have it active; results keep input order."""
    fleet = _fleet(ctx)
    job_id = fleet.submit(model, data, to=list(to) or None, batch_size=batch_size, lease_s=lease_s,
                          output=str(Path(output).resolve()), fmt=fmt)
    if not as_json:
        click.echo(f"job {job_id} created (resume it with edgesdk fleet job resume {job_id})", err=True)
    with _driving(ctx) as fleet:
        _follow_job(fleet, job_id, as_json)


@fleet_group.command("job")
@click.argument("words", nargs=-1, required=True, metavar="ID | resume ID")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write a finished job's results to this file (.npz, or JSON lines with --format jsonl).")
@click.option("--format", "fmt", type=click.Choice(["npz", "jsonl"]), default="npz", show_default=True)
@click.pass_context
def job_command(ctx: click.Context, words: tuple[str, ...], as_json: bool, output: Optional[str], fmt: str) -> None:
    """Show a job's progress (`job ID`) or resume it after a fleet process died (`job resume ID`);
    with --output, write its results (from any machine that reaches the fleet's database)."""
    from sdk.cli import echo_json

    if words[0] == "resume":
        if len(words) != 2:
            raise click.UsageError("usage: edgesdk fleet job resume ID")
        with _driving(ctx) as fleet:
            _follow_job(fleet, words[1], as_json)
        return
    if len(words) != 1:
        raise click.UsageError("usage: edgesdk fleet job ID  |  edgesdk fleet job resume ID")
    fleet = _fleet(ctx)
    s = fleet.job(words[0])
    if output:
        if s.state != "SUCCEEDED":
            from sdk.errors import JobError

            raise JobError(f"job {s.id} is {s.state}: its results can be written once it SUCCEEDED")
        fleet.write_outputs(s.id, output, fmt)
        s.output = str(output)
    if as_json:
        echo_json(s.to_dict())
    else:
        click.echo("\n".join(_job_lines(s)))
        click.echo("  tasks: " + " ".join(f"{k}={v}" for k, v in s.counts.items()))


@fleet_group.command("jobs")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def jobs_command(ctx: click.Context, as_json: bool) -> None:
    """List batch jobs, newest first."""
    from sdk.cli import echo_json

    jobs = _fleet(ctx).jobs_list()
    if as_json:
        echo_json([j.to_dict() for j in jobs])
        return
    for j in jobs:
        click.echo(_job_lines(j)[0])


# --- simulate ------------------------------------------------------------------------------------
@fleet_group.command("simulate")
@click.argument("count", type=int)
@click.option("--model", "models", multiple=True, metavar="NAME=VERSION", help="A model the devices run (repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Tags of every simulated device.")
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-0000, PREFIX-0001, ...")
@click.option("--infer-ms", type=float, default=1.0, show_default=True, help="Simulated inference time per sample.")
@click.option("--capacity", type=int, default=1, show_default=True, help="Work slots per device.")
@click.option("--prefetch", type=click.IntRange(0, 64), default=4, show_default=True,
              help="Tasks each device holds queued beyond those running (as an agent's prefetch).")
@click.pass_context
def simulate_command(ctx: click.Context, count: int, models: tuple[str, ...], tags: tuple[str, ...], prefix: str,
                     infer_ms: float, capacity: int, prefetch: int) -> None:
    """Run COUNT simulated devices (real protocol, fake inference) until SIGTERM/SIGINT."""
    from sdk.mqtt import MqttSettings

    from .registry import parse_tags
    from .sim import SimulatedDevices

    o = ctx.obj["fleet_options"]
    settings = MqttSettings.from_url(o["broker"], username=o["username"], password=o["password"], ca_file=o["ca_file"],
                                     client_cert=o["client_cert"], client_key=o["client_key"], protocol=o["protocol"], extra="fleet")
    model_map = parse_tags(list(models))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sims = SimulatedDevices(count, settings=settings, prefix=prefix, tags=parse_tags(list(tags)), models=model_map,
                            capacity=capacity, prefetch=prefetch, infer_s=infer_ms / 1000.0).start()
    click.echo(f"{count} simulated devices online ({prefix}-0000 ...); Ctrl-C stops them", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sims.stop()


# --- credentials -----------------------------------------------------------------------------------
def _credentials_store(ctx: click.Context, directory: Optional[str]) -> Any:
    from .credentials import CredentialsStore, default_credentials_dir

    return CredentialsStore(directory or default_credentials_dir(ctx.obj["fleet_options"]["state"]))


def _fleet_usage_lines(fleet: Any) -> list[str]:
    import shlex

    return ["fleet controller (CN edgesdk-fleet): edgesdk fleet " + shlex.join(fleet.cli_options()) + " serve",
            "  or in its environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in fleet.environment().items())]


_DIR_OPTION = click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                           help="Credentials directory [default: <fleet state dir>/credentials].")


@fleet_group.group("credentials")
def credentials_group() -> None:
    """Per-device certificates and a locked-down broker (CA, ACL, CRL); see docs/security.md."""


@credentials_group.command("init")
@_DIR_OPTION
@click.option("--broker-host", "broker_hosts", multiple=True, metavar="NAME",
              help="A name or IP address agents use to reach the broker (repeatable; 127.0.0.1 and localhost "
                   "are always in the certificate). The first one goes into the agent config lines.")
@click.option("--port", type=int, default=8883, show_default=True, help="The broker's TLS listener port.")
@click.option("--bind", default="", help="Address the listener binds to [default: all].")
@click.option("--broker-files-dir", type=click.Path(file_okay=False), default=None,
              help="Where the broker host keeps the broker/ files (the paths in edgesdk.conf) [default: DIR/broker].")
@click.option("--force", is_flag=True, help="Replace an existing CA (every certificate issued so far stops working).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.pass_context
def credentials_init_command(ctx: click.Context, directory: Optional[str], broker_hosts: tuple[str, ...], port: int,
                             bind: str, broker_files_dir: Optional[str], force: bool, as_json: bool) -> None:
    """Make the fleet CA, the broker's configuration and certificates (broker, fleet).

    Prints the fleet-side options that use the fleet's own certificate (CN edgesdk-fleet)."""
    from sdk.cli import echo_json

    store = _credentials_store(ctx, directory)
    files = store.init(broker_hosts=broker_hosts, port=port, bind=bind, broker_files_dir=broker_files_dir, force=force)
    fleet = store.fleet()
    if as_json:
        echo_json({"directory": str(store.directory), "broker": files.to_dict(), "fleet": fleet.to_dict()})
        return
    click.echo(f"fleet CA written to {store.directory}")
    click.echo(f"broker: {files.config} (listener {files.port}, TLS with client certificates, ACL, CRL); run it with")
    click.echo(f"  include_dir {files.directory}   in mosquitto.conf (see docs/security.md)")
    click.echo("\n".join(_fleet_usage_lines(fleet)))
    click.echo("devices: edgesdk fleet credentials issue DEVICE...")


@credentials_group.command("issue")
@click.argument("devices", nargs=-1, required=True)
@_DIR_OPTION
@click.option("--broker-url", default=None, help="The broker URL agents use [default: mqtts://<first --broker-host>:PORT].")
@click.option("--install-dir", type=click.Path(file_okay=False), default=None,
              help="Where the files will be on the device (the paths in the config lines), e.g. /etc/edgesdk "
                   "[default: where they are written].")
@click.option("--replace", is_flag=True, help="Issue a new certificate to a device that has one; the old one is revoked.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.pass_context
def credentials_issue_command(ctx: click.Context, devices: tuple[str, ...], directory: Optional[str],
                              broker_url: Optional[str], install_dir: Optional[str], replace: bool, as_json: bool) -> None:
    """Write a certificate (CN = DEVICE), key, CA file and agent config lines per DEVICE."""
    from sdk.cli import echo_json

    store = _credentials_store(ctx, directory)
    issued = store.issue(*devices, broker_url=broker_url, install_dir=install_dir, replace=replace)
    if as_json:
        echo_json([c.to_dict() for c in issued])
        return
    for creds in issued:
        replaced = f"; replaces (revoked) {', '.join(f'{s:x}' for s in creds.replaced)}" if creds.replaced else ""
        click.echo(f"{creds.device}: {creds.directory} (ca.pem, client.pem, client.key){replaced}")
        click.echo(creds.config_lines(), nl=False)
    if any(c.replaced for c in issued):
        click.echo(f"the CRL changed: restart the broker (or send it SIGHUP) so it reads {store.broker().crlfile}")


@credentials_group.command("revoke")
@click.argument("devices", nargs=-1, required=True)
@_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the revoked certificates as JSON.")
@click.pass_context
def credentials_revoke_command(ctx: click.Context, devices: tuple[str, ...], directory: Optional[str],
                               as_json: bool) -> None:
    """Put each DEVICE's certificates on the CRL, so the broker refuses them.

    Mosquitto reads the CRL at start and on SIGHUP (new connections only): restart it to close
    a revoked device's open connection too."""
    from sdk.cli import echo_json

    store = _credentials_store(ctx, directory)
    revoked = store.revoke(*devices)
    crl = store.broker().crlfile
    if as_json:
        echo_json({"crlfile": str(crl), "revoked": {d: [c.to_dict() for c in certs] for d, certs in revoked.items()}})
        return
    for device, certs in revoked.items():
        serials = ", ".join(f"{c.serial:x}" for c in certs)
        click.echo(f"{device}: revoked {serials}" if certs else f"{device}: already revoked")
    click.echo(f"{crl} rewritten: restart the broker so it refuses them and closes their open connections "
               "(SIGHUP makes Mosquitto refuse new connections only)")


@credentials_group.command("show")
@_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def credentials_show_command(ctx: click.Context, directory: Optional[str], as_json: bool) -> None:
    """The broker's files, the fleet's own options and every certificate issued."""
    from sdk.cli import echo_json

    store = _credentials_store(ctx, directory)
    files, fleet, certs = store.broker(), store.fleet(), store.certificates()
    if as_json:
        echo_json({"directory": str(store.directory), "broker": files.to_dict(), "fleet": fleet.to_dict(),
                   "certificates": [c.to_dict() for c in certs]})
        return
    click.echo(f"broker: {files.config} (listener {files.port}, {files.url})")
    click.echo("\n".join(_fleet_usage_lines(fleet)))
    click.echo(f"{'IDENTITY':<24} {'KIND':<7} {'SERIAL':<41} {'EXPIRES':<26} REVOKED")
    for c in certs:
        click.echo(f"{c.identity:<24} {c.kind:<7} {c.serial:<41x} {c.not_after:<26} {c.revoked_at or '-'}")
