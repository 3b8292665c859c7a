"""``edgesdk demo``: the whole product in one command, on an embedded broker.

Trains a small CNN on scikit-learn's bundled digits, converts it (``--target cpu --quantize
auto --max-accuracy-drop 1``) and signs it, starts N agents as separate processes with their
own state directories, deploys version 1 to all of them, deploys a pruned version 2 with a
canary stage, runs the digits test set as a distributed job, prints accuracy, samples/s,
per-device share and efficiency, and stops everything it started. Needs the ``converter``
extra (TensorFlow, to train and convert) besides ``agent`` and ``fleet``: it lives above every role,
in the package of the ``edgesdk`` command, and is imported only when it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np

from sdk.errors import FleetError

__all__ = ["DemoResult", "run_demo", "demo_command"]


@dataclass
class DemoResult:
    work_dir: Path
    broker_url: str
    bundles: list[Path] = field(default_factory=list)
    rollouts: list[Any] = field(default_factory=list)
    job: Any = None
    accuracy: float = 0.0
    conversion: dict[str, Any] = field(default_factory=dict)
    report: Optional[Path] = None


class _Steps:
    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total, self.n, self.echo, self.t0 = total, 0, echo, time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        self.echo(f"[{self.n}/{self.total}] {text} (t+{time.monotonic() - self.t0:.0f}s)")


def run_demo(*, devices: int = 3, broker: Optional[str] = None, keep: bool = False, report_dir: Optional[Path] = None,
             work_dir: Optional[Path] = None, epochs: int = 10, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the demo; raise an EdgeSdkError naming the step that failed."""
    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from fleet import Fleet
    from fleet.broker import EmbeddedBroker
    from sdk.signing import generate_keys

    if devices < 1:
        raise FleetError("--devices must be at least 1")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edgesdk-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    step = _Steps(9, echo)
    embedded = None
    agents: list[subprocess.Popen] = []
    fleet = None
    try:
        if broker:
            url = broker
            _check_reachable(url)
            step(f"using the broker at {url}")
        else:
            embedded = EmbeddedBroker().start()
            url = embedded.url
            step(f"started an embedded {embedded.kind} broker on {url} (loopback only)")
        result = DemoResult(work, url)

        private, public = generate_keys(work / "keys")
        data = load_digits_split()
        step(f"generated a signing key; training a CNN on scikit-learn's digits ({len(data.x_train)} train / "
             f"{len(data.x_test)} test images)")
        model, float_acc = train_digits_cnn(data, epochs=epochs)
        model.save(work / "digits.keras")
        np.savez(work / "calibration.npz", x=data.x_train[:300])
        np.savez(work / "test.npz", x=data.x_test, y=data.y_test)
        np.savez(work / "train.npz", x=data.x_train, y=data.y_train)
        echo(f"      Keras test accuracy {100 * float_acc:.2f}%")

        step("converting version 1: --target cpu --quantize auto --max-accuracy-drop 1")
        v1 = convert(work / "digits.keras", target="cpu", quantize="auto", max_accuracy_drop=1.0, version="1",
                     calibration=work / "calibration.npz", eval_data=work / "test.npz", key=private,
                     output=work / "digits-1.edgebundle")
        echo(v1.table())
        result.bundles.append(v1.bundle_path)
        result.conversion = v1.report

        step(f"starting {devices} agents as separate processes")
        agents = _start_agents(work, url, public, devices)
        fleet = Fleet(work / "fleet", url).start()
        _wait_online(fleet, agents, devices)
        for d in fleet.devices():
            echo(f"      {d.id}: online, {d.runtime.get('name')} {d.runtime.get('version')}, delegates {d.delegates}")

        step("deploying version 1 to every agent")
        view = fleet.wait_rollout(fleet.deploy(v1.bundle_path, to={"demo": "1"}, canary=1, batch_percent=100,
                                               timeout=120), timeout=300)
        _check_rollout(view, echo)
        result.rollouts.append(view)

        step("converting version 2: pruned to 50 % sparsity, fine-tuned, --quantize auto")
        v2 = convert(work / "digits.keras", target="cpu", quantize="auto", max_accuracy_drop=1.0, version="2",
                     prune=0.5, train=work / "train.npz", epochs=2, calibration=work / "calibration.npz",
                     eval_data=work / "test.npz", key=private, output=work / "digits-2.edgebundle")
        echo(f"      chose {v2.report.get('chosen', '?')}: "
             f"{v2.bundle_path.stat().st_size / 1024:.1f} KB bundle (version 1: {v1.bundle_path.stat().st_size / 1024:.1f} KB)")
        result.bundles.append(v2.bundle_path)

        step("rolling version 2 out: 1 canary, then the rest; abort on a 5x latency regression or any failure")
        view = fleet.wait_rollout(fleet.deploy(v2.bundle_path, to={"demo": "1"}, canary=1, batch_percent=100,
                                               max_latency_regression=5.0, max_failure_percent=0, timeout=120),
                                  timeout=300)
        _check_rollout(view, echo)
        result.rollouts.append(view)

        step(f"running the digits test set ({len(data.x_test)} images) as a distributed job")
        job = fleet.run("digits", data.x_test, batch_size=12, output=work / "results.npz", timeout=300)
        result.job = job
        result.accuracy = float(np.mean(np.argmax(job.outputs[0], axis=1) == data.y_test))
        echo(f"      accuracy {100 * result.accuracy:.2f}% on {job.samples} images, {job.samples_per_s:,.0f} samples/s, "
             f"{job.tasks} tasks, retries {job.retries}, efficiency estimate {job.efficiency:.2f}")
        for dev, d in job.devices.items():
            echo(f"      {dev}: {100 * d['share']:.0f} % of the samples, {d['throughput']:,.0f} samples/s while busy")
        if report_dir is not None:
            result.report = _write_report(Path(report_dir), result, fleet, float_acc)
            echo(f"      report: {result.report}")

        if keep:
            step("leaving the broker and agents running (--keep)")
            fleet.stop()
            fleet = None
            echo(f"      EDGESDK_FLEET_BROKER={url} EDGESDK_FLEET_STATE={work / 'fleet'} edgesdk fleet devices")
            broker_pid = f", broker pid {embedded.pid}" if embedded is not None and embedded.pid else ""
            echo(f"      agents: pids {' '.join(str(p.pid) for p in agents)}{broker_pid}; stop them with kill -TERM")
            if embedded is not None and embedded.kind == "amqtt":
                echo("      the embedded amqtt broker lives in this process: Ctrl-C stops everything")
                _wait_for_interrupt()
            else:
                agents, embedded = [], None  # leave them running
        else:
            step("stopping the agents, the fleet and the broker")
            fleet.stop()
            fleet = None
            codes = _stop_agents(agents)
            echo(f"      agents exited with {', '.join(map(str, codes))} (SIGTERM: clean shutdown)")
            if any(codes):
                raise FleetError(f"an agent did not shut down cleanly (exit codes {codes}): see {work}/demo-*.log")
        return result
    finally:
        if fleet is not None:
            fleet.stop()
        _stop_agents(agents)
        if embedded is not None:
            embedded.stop()


def _check_reachable(url: str) -> None:
    import socket

    from sdk.errors import BrokerError
    from sdk.mqtt import MqttSettings

    s = MqttSettings.from_url(url)
    try:
        socket.create_connection((s.host, s.port), timeout=5).close()
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {s.host}:{s.port} ({exc.strerror or exc}): start it, or leave "
                          "out --broker to use an embedded one") from exc


def _start_agents(work: Path, url: str, public: Path, n: int) -> list[subprocess.Popen]:
    from agent.config import load_config

    procs = []
    for i in range(n):
        name = f"demo-{i + 1}"
        cfg = load_config(None, env={}, device_id=name, broker_url=url, state_dir=work / name,
                          trusted_keys=[str(public)], threads=1, pool_size=1, heartbeat_interval=2.0,
                          tags={"demo": "1", "slot": str(i + 1)})
        path = work / f"{name}.toml"
        path.write_text(cfg.to_toml())
        log = open(work / f"{name}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--config", str(path)],
                                      stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}))
        log.close()
    return procs


def _wait_online(fleet: Any, agents: list[subprocess.Popen], n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, p in enumerate(agents):
            if p.poll() is not None:
                raise FleetError(f"agent demo-{i + 1} exited with code {p.returncode}: see {fleet.state_dir.parent}/demo-{i + 1}.log")
        if len([d for d in fleet.devices({"demo": "1"}) if d.online]) >= n:
            return
        time.sleep(0.2)
    raise FleetError(f"the agents did not come online within {timeout:g} s: see the demo-*.log files in {fleet.state_dir.parent}")


def _check_rollout(view: Any, echo: Callable[[str], None]) -> None:
    for d in view.devices:
        lat = f", p50 {d['p50_ms']:.3f} ms (was {d['previous_p50_ms']:.3f})" if d["p50_ms"] and d["previous_p50_ms"] else ""
        echo(f"      {d['device']} stage {d['stage']}: {d['state']}{lat} {d['reason']}".rstrip())
    echo(f"      rollout {view.id}: {view.state} ({view.reason})")
    if view.state != "SUCCEEDED":
        raise FleetError(f"rollout of {view.model}@{view.version} ended {view.state}: {view.reason}")


def _stop_agents(agents: list[subprocess.Popen]) -> list[int]:
    for p in agents:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in agents:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    return [p.returncode for p in agents]


def _wait_for_interrupt() -> None:
    stop = False

    def handler(*_: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not stop:
        time.sleep(0.5)


def _write_report(directory: Path, result: DemoResult, fleet: Any, float_acc: float) -> Path:
    """report.md with the conversion table and chart and the job's per-device throughput over time."""
    from converter.report import render_table, write_report_dir

    directory.mkdir(parents=True, exist_ok=True)
    write_report_dir(result.conversion, directory)  # report.json + conversion.png
    job = result.job
    chart = directory / "job.png"
    _job_chart(fleet.task_log(job.id), chart)
    lines = [
        "# edgesdk demo report", "",
        f"Broker {result.broker_url}; {len(job.devices)} agents; digits CNN, Keras test accuracy {100 * float_acc:.2f}%.", "",
        "## Conversion (version 1)", "", "```", render_table(result.conversion), "```", "",
        "![size, latency and accuracy per recipe](conversion.png)", "",
        "## Rollouts", "",
    ]
    for v in result.rollouts:
        lines.append(f"* {v.model}@{v.version}: {v.state} ({v.reason})")
    lines += ["", "## Distributed job", "",
              f"{job.samples} samples in {job.tasks} tasks, {job.samples_per_s:,.0f} samples/s, retries {job.retries}, "
              f"efficiency estimate {job.efficiency:.2f}, accuracy {100 * result.accuracy:.2f}%.", "",
              "| device | samples | share | samples/s while busy |", "|---|---|---|---|"]
    for dev, d in job.devices.items():
        lines.append(f"| {dev} | {d['samples']} | {100 * d['share']:.0f} % | {d['throughput']:,.0f} |")
    lines += ["", "![per-device throughput over time](job.png)", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path


def _job_chart(rows: list[dict[str, Any]], path: Path) -> None:
    from sdk.deps import require

    matplotlib = require("matplotlib", "demo", "to draw report charts")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "demo", "to draw report charts")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if rows:
        t0 = min(r["done_at"] - (r["elapsed_s"] or 0) for r in rows)
        for dev in sorted({r["device"] for r in rows}):
            mine = sorted((r for r in rows if r["device"] == dev), key=lambda r: r["done_at"])
            ax.step([r["done_at"] - t0 for r in mine], np.cumsum([r["samples"] for r in mine]), where="post", label=dev)
        ax.legend()
    ax.set_xlabel("seconds since the job started")
    ax.set_ylabel("samples done")
    ax.set_title("distributed job: samples per device over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- demo ------------------------------------------------------------------------------------------
@click.command("demo")
@click.option("--devices", type=int, default=3, show_default=True, help="Agents to start (separate processes).")
@click.option("--broker", default=None, help="Use this broker (mqtt://...) instead of an embedded one.")
@click.option("--keep", is_flag=True, help="Leave the broker and agents running and print how to talk to them.")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Write report.md with PNG charts (conversion per recipe, job throughput per device).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the model, bundles, keys, agent state and logs here (default: a new temporary directory).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Training epochs for the digits CNN.")
def demo_command(devices: int, broker: Optional[str], keep: bool, report_dir: Optional[str], work_dir: Optional[str],
                 epochs: int) -> None:
    """The whole product in a few minutes: train, convert, sign, serve on N agents, roll out a
    version 2 with a canary, and run the digits test set across the fleet."""
    result = run_demo(devices=devices, broker=broker, keep=keep, report_dir=Path(report_dir) if report_dir else None,
                      work_dir=Path(work_dir) if work_dir else None, epochs=epochs, echo=lambda s: click.echo(s))
    click.echo(f"demo finished: accuracy {100 * result.accuracy:.2f}% across {len(result.job.devices)} agents; "
               f"files in {result.work_dir}")
