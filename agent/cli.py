"""``edgesdk agent ...``: run the daemon, set a device up, list and roll back models."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import click

__all__ = ["agent_group"]

UNIT_NAME = "edgesdk-agent.service"
CONFIG_PATH = Path("/etc/edgesdk/agent.toml")

UNIT_TEMPLATE = """[Unit]
Description=edgesdk agent: on-device model serving and fleet link
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={python} -m sdk agent run --config {config}
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=multi-user.target
"""


def _config_option(f: Any) -> Any:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=str(CONFIG_PATH),
                        show_default=True, help="Agent configuration (TOML).")(f)


@click.group("agent")
def agent_group() -> None:
    """The on-device agent: serve models, install bundles, report to the fleet."""


@agent_group.command("run")
@_config_option
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
              help="MQTT protocol version (auto: 5, else 3.1.1).")
@click.option("--no-mqtt", is_flag=True, help="Serve the local API only, without the fleet link.")
def run_command(config_path: str, protocol: str, no_mqtt: bool) -> None:
    """Run the agent in the foreground (systemd-friendly: logs to stderr, stops on SIGTERM)."""
    from .config import load_config
    from .daemon import Agent

    stop = threading.Event()  # handlers first: a SIGTERM during start-up still shuts down cleanly
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = load_config(config_path)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    log = logging.getLogger("edgesdk.agent")
    agent = Agent(cfg).start()
    link = None
    if not no_mqtt:
        from .link import AgentLink

        link = AgentLink(agent, protocol=protocol).start()
    log.info("agent %s serving %s on %s; broker %s", cfg.device_id,
             ", ".join(m["name"] for m in agent.models()) or "no models yet", cfg.socket_path,
             "off" if no_mqtt else cfg.broker_url)
    stop.wait()
    log.info("stopping")
    if link is not None:
        link.stop()
    agent.stop()


@agent_group.command("install")
@_config_option
@click.option("--root", type=click.Path(file_okay=False), default="/", show_default=True,
              help="Install into this tree instead of / (for images and tests).")
@click.option("--dry-run", is_flag=True, help="Print what would be done, change nothing.")
def install_command(config_path: str, root: str, dry_run: bool) -> None:
    """Set a device up: state directory, /etc/edgesdk/agent.toml and a systemd unit."""
    from .config import load_config

    cfg = load_config(config_path)
    base = Path(root)

    def under(p: Path) -> Path:
        return base / p.relative_to("/") if p.is_absolute() else base / p

    actions = [
        ("create state directory", under(cfg.state_dir), None),
        ("write config", under(CONFIG_PATH), cfg.to_toml()),
        ("write systemd unit", under(Path("/etc/systemd/system") / UNIT_NAME),
         UNIT_TEMPLATE.format(python=sys.executable, config=CONFIG_PATH)),
    ]
    for what, path, content in actions:
        click.echo(f"{'would ' if dry_run else ''}{what}: {path}")
        if dry_run:
            continue
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o750)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            if path.name == "agent.toml":
                path.chmod(0o640)  # it may hold the broker password
    missing = [str(k) for k in cfg.trusted_keys if not under(k).exists()]
    if missing:
        click.echo(f"note: trusted key(s) {', '.join(missing)} not found: copy your public.pem there", err=True)
    click.echo("then: systemctl daemon-reload && systemctl enable --now " + UNIT_NAME)


def _client(cfg: Any) -> Optional[Any]:
    from sdk.errors import InferenceError

    from .client import AgentClient

    try:
        return AgentClient(cfg.socket_path, timeout=10)
    except InferenceError:
        return None


@agent_group.command("models")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models_command(config_path: str, as_json: bool) -> None:
    """List installed and active models (from the running agent, else from the store)."""
    from sdk.cli import echo_json

    from .config import load_config
    from .store import ModelStore

    cfg = load_config(config_path)
    client = _client(cfg)
    if client is not None:
        with client:
            rows = client.models()
        source = "running agent"
    else:
        rows = [{"name": r["name"], "active": r["active"], "previous": r["previous"],
                 "stored": r["versions"].split(",") if r["versions"] else []} for r in ModelStore(cfg.state_dir).describe()]
        source = "store (agent not running)"
    if as_json:
        echo_json(rows)
        return
    click.echo(f"models ({source}):")
    for r in rows:
        stats = r.get("stats") or {}
        extra = f"  p50 {stats['p50_ms']:.3f} ms, {stats['requests']} requests" if stats.get("count") else ""
        click.echo(f"  {r['name']}: active {r['active']}, previous {r['previous']}, stored {r.get('stored')}{extra}")


@agent_group.command("rollback")
@click.argument("name")
@_config_option
def rollback_command(name: str, config_path: str) -> None:
    """Reactivate NAME's previous version (live when the agent runs, else at its next start)."""
    from sdk.errors import InstallError

    from .config import load_config
    from .store import ModelStore

    cfg = load_config(config_path)
    client = _client(cfg)
    if client is not None:
        with client:
            try:
                result = client.rollback(name)
            except Exception as exc:
                raise InstallError(str(exc)) from exc
        click.echo(f"rolled {name} back to {result['version']} (was {result['previous']})")
        return
    store = ModelStore(cfg.state_dir)
    target, current = store.previous(name), store.active(name)
    if not target:
        raise InstallError(f"{name} has no previous version to roll back to")
    store.activate(name, target, previous=current)
    click.echo(f"{name}: active version set to {target} (was {current}); takes effect when the agent starts")
