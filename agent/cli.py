"""``edgesdk agent ...``: run the daemon, set a device up, list and roll back models."""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import re
import shlex
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import click

from sdk.errors import ConfigError

from .config import AgentConfig, load_config

__all__ = ["agent_group"]

UNIT_NAME = "edgesdk-agent.service"
CONFIG_PATH = Path("/etc/edgesdk/agent.toml")
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_PATH = Path("/etc/sysusers.d/edgesdk.conf")  # systemd-sysusers creates the user at boot (images)
DEFAULT_USER = "edgesdk"
RUNTIME_SOCKET = Path("/run/edgesdk/agent.sock")  # the local API, where apps in the agent's group reach it
STATE_ROOT = Path("/var/lib")  # StateDirectory= is relative to it
RUNTIME_ROOT = Path("/run")  # RuntimeDirectory= is relative to it
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))  # what ProtectHome= hides
NOLOGIN = "/usr/sbin/nologin"
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")


@dataclass(frozen=True)
class DeviceAccess:
    """What one delegate needs from /dev: cgroup device rules, the groups that own its nodes on
    common distributions (udev rules of libedgetpu and the gasket driver, Mesa), and whether its
    driver library watches USB hot-plug over netlink (libusb does: the Edge TPU re-enumerates after
    its firmware is loaded)."""

    device_allow: tuple[str, ...]
    groups: tuple[str, ...]
    netlink: bool


DELEGATE_DEVICES = {
    "gpu": DeviceAccess(("char-drm rw",), ("render", "video"), netlink=False),  # /dev/dri/*
    "edgetpu": DeviceAccess(("char-apex rw", "char-usb_device rw"), ("apex", "plugdev"), netlink=True),  # PCIe, USB
}

UNIT_TEMPLATE = """[Unit]
Description=edgesdk agent: on-device model serving and fleet link
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# Its own unprivileged user, plus the groups owning the delegates' device nodes (those that exist here).
User={user}
Group={group}
{supplementary_groups}# Writable: the state dir and the local API's socket dir; everything else is read-only or hidden.
{directories}UMask=0077
ProtectSystem=strict
ProtectHome={protect_home}
{bind_read_only}PrivateTmp=yes
{devices}# No privileges, and no way to gain any.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictSUIDSGID=yes
{private_users}# The kernel, the clock, the host name and other processes are out of reach.
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
PrivateIPC=yes
PrivateMounts=yes
RemoveIPC=yes
KeyringMode=private
# The broker (IPv4/IPv6) and the local API (unix){netlink_reason}.
RestrictAddressFamilies={address_families}
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
# LiteRT's CPU kernels and XNNPACK generate no code at run time: the agent serves under this unchanged.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# EPERM, not a kill: numpy's OpenBLAS asks for NUMA placement (mbind, in @resources) and carries on without.
SystemCallErrorNumber=EPERM

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
    lock = _state_lock(cfg)  # held while the agent runs: agent deploy/rollback change a stopped agent's store only
    if not lock.acquire():
        raise ConfigError(f"state_dir {cfg.state_dir} is in use by pid {lock.holder()} ({lock.path}): another agent "
                          "runs on it, or edgesdk agent deploy is installing into it; stop that agent, or start again "
                          "when the deploy has finished")
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
    lock.release()


@dataclass(frozen=True)
class Account:
    """The agent's system user as the target's account database records it."""

    name: str
    uid: int
    gid: int
    group: str


class Target:
    """The tree ``agent install`` sets up (``/`` or an image root): its paths and account database.

    For ``/`` users and groups come from NSS (``pwd``/``grp``); for any other root from that root's
    ``/etc/passwd`` and ``/etc/group``, so an image build never consults or changes the host's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.is_host = root.resolve() == Path("/")

    def path(self, p: Path) -> Path:
        """``p`` (a path on the target) as a path on this machine."""
        return self.root / p.relative_to("/") if p.is_absolute() else self.root / p

    def has_passwd(self) -> bool:
        return self.path(Path("/etc/passwd")).exists()

    def _entries(self, database: str) -> list[list[str]]:
        file = self.path(Path("/etc") / database)
        if not file.exists():
            return []
        return [line.split(":") for line in file.read_text().splitlines() if line and not line.startswith("#")]

    def account(self, user: str) -> Optional[Account]:
        """``user``'s uid, primary gid and group name, or None when the target has no such user."""
        if self.is_host:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                return None
            return Account(user, entry.pw_uid, entry.pw_gid, self.group_name(entry.pw_gid))
        for fields in self._entries("passwd"):
            if len(fields) >= 4 and fields[0] == user:
                return Account(user, int(fields[2]), int(fields[3]), self.group_name(int(fields[3])))
        return None

    def group_name(self, gid: int) -> str:
        if self.is_host:
            try:
                return grp.getgrgid(gid).gr_name
            except KeyError:
                return str(gid)
        return next((f[0] for f in self._entries("group") if len(f) >= 3 and f[2] == str(gid)), str(gid))

    def existing_groups(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are groups on the target (SupplementaryGroups= fails on any other)."""
        known = {g.gr_name for g in grp.getgrall()} if self.is_host else {f[0] for f in self._entries("group")}
        return [n for n in names if n in known]


def delegate_devices(delegate: str) -> list[DeviceAccess]:
    """The device access the configured delegate may need (``auto`` tries Edge TPU and GPU)."""
    if delegate == "auto":
        return [DELEGATE_DEVICES["gpu"], DELEGATE_DEVICES["edgetpu"]]
    return [DELEGATE_DEVICES[delegate]] if delegate in DELEGATE_DEVICES else []


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without those inside another one of them."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(q in p.parents for q in unique)]


def interpreter_paths() -> list[Path]:
    """Where the Python running this command and edgesdk's own code live (the unit runs both)."""
    here = Path(__file__).resolve().parents[1]
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    return _outermost([Path(p).resolve() for p in prefixes] + [here])


def _files_read(cfg: AgentConfig) -> list[Path]:
    named = [*cfg.trusted_keys, cfg.ca_file, cfg.client_cert, cfg.client_key, cfg.gpu_delegate_path]
    return [Path(p) for p in named if str(p)]


def _unit_quote(word: str) -> str:
    """One ExecStart= word: ``%`` and ``$`` escaped (specifiers, variables), quoted if needed."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c.isspace() or c in "\"'\\;" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def installed_config(cfg: AgentConfig) -> AgentConfig:
    """The configuration as installed: a socket left at its default moves to /run/edgesdk
    (``RuntimeDirectory=``), where apps in the agent's group reach it without the state dir."""
    if cfg.socket_path == cfg.state_dir / "agent.sock":
        cfg = dataclasses.replace(cfg, socket_path=RUNTIME_SOCKET)
    for what, path in (("state_dir", cfg.state_dir), ("socket_path", cfg.socket_path)):
        if not path.is_absolute() or _under(path, HOME_DIRS):
            raise ConfigError(f"{what} {path}: the service cannot write there (ProtectHome= hides home directories); "
                              "use an absolute path such as /var/lib/edgesdk")
    return cfg


def _directory_lines(cfg: AgentConfig) -> str:
    """StateDirectory=/RuntimeDirectory= where the paths allow it (systemd creates and chowns
    them), else ReadWritePaths= (``agent install`` creates those)."""
    lines, writable = [], []
    state = cfg.state_dir
    if STATE_ROOT in state.parents:
        lines += [f"StateDirectory={state.relative_to(STATE_ROOT)}", "StateDirectoryMode=0750"]
    else:
        writable.append(state)
    sockets = cfg.socket_path.parent
    if _under(sockets, [state]):
        pass
    elif RUNTIME_ROOT in sockets.parents:
        lines += [f"RuntimeDirectory={sockets.relative_to(RUNTIME_ROOT)}", "RuntimeDirectoryMode=0750"]
    else:
        writable.append(sockets)
    if writable:
        lines.append("ReadWritePaths=" + " ".join(_unit_quote(str(p)) for p in writable))
    return "".join(f"{line}\n" for line in lines)


def _device_lines(devices: list[DeviceAccess]) -> str:
    if not devices:
        return "PrivateDevices=yes\n"
    rules = [rule for d in devices for rule in d.device_allow]
    return ("# The delegates' device nodes and the pseudo devices (/dev/null, /dev/urandom, ...), nothing else.\n"
            "PrivateDevices=no\nDevicePolicy=closed\n" + "".join(f"DeviceAllow={r}\n" for r in rules))


def render_unit(cfg: AgentConfig, account_name: str, group: str, supplementary: list[str],
                python: str = sys.executable, home_paths: Iterable[Path] = ()) -> str:
    """The systemd unit for ``cfg`` (as installed), run as ``account_name``:``group``.

    ``home_paths`` are paths under /home, /root or /run/user the agent must read (its Python, key
    files): the unit hides home directories behind an empty tmpfs and binds just those, read-only."""
    devices = delegate_devices(cfg.delegate)
    binds = _outermost(Path(p) for p in home_paths)
    netlink = any(d.netlink for d in devices)
    exec_start = [python, "-m", "edgesdk", "agent", "run", "--config", str(CONFIG_PATH)]
    return UNIT_TEMPLATE.format(
        exec_start=" ".join(_unit_quote(w) for w in exec_start),
        user=account_name,
        group=group,
        supplementary_groups=f"SupplementaryGroups={' '.join(supplementary)}\n" if supplementary else "",
        directories=_directory_lines(cfg),
        protect_home="tmpfs" if binds else "yes",
        # "-": a missing key file is the agent's to report (it names the setting), not a namespace failure
        bind_read_only="".join(f"BindReadOnlyPaths={_unit_quote('-' + str(p))}\n" for p in binds),
        devices=_device_lines(devices),
        # with device groups a user namespace would map them to nobody and lose the device access
        private_users="" if devices else "PrivateUsers=yes\n",
        address_families="AF_UNIX AF_INET AF_INET6" + (" AF_NETLINK" if netlink else ""),
        netlink_reason=", netlink for libusb's USB hot-plug (Edge TPU)" if netlink else "",
    )


def _useradd_command(target: Target, user: str, home: Path) -> list[str]:
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home), "--shell", NOLOGIN]
    if not target.is_host:
        cmd += ["--root", str(target.root.resolve())]
    return cmd + [user]


def ensure_account(target: Target, user: str, home: Path, dry_run: bool) -> Optional[Account]:
    """The agent's user on the target, created with ``useradd`` when missing. None when it is not
    created: on a dry run, or in a root without /etc/passwd (then systemd-sysusers creates it at boot)."""
    found = target.account(user)
    if found is not None:
        click.echo(f"user {user} exists: uid {found.uid}, group {found.group}")
        return found
    cmd = _useradd_command(target, user, home)
    if dry_run or not (target.is_host or target.has_passwd()):
        why = "" if dry_run else f" ({target.root} has no /etc/passwd: {SYSUSERS_PATH} creates the user at boot)"
        click.echo(f"would create user {user}: {shlex.join(cmd)}{why}")
        return None
    click.echo(f"create user {user}: {shlex.join(cmd)}")
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"useradd is not installed: create the system user {user} (home {home}, shell {NOLOGIN}) "
                          "and run agent install again") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()
        raise ConfigError(f"useradd could not create user {user}: {detail[-1] if detail else exc}") from exc
    for line in done.stderr.strip().splitlines():
        click.echo(f"note: {line}", err=True)
    created = target.account(user)
    if created is None:
        raise ConfigError(f"useradd reported success but user {user} is not in {target.path(Path('/etc/passwd'))}")
    return created


def _chown_tree(path: Path, account: Account) -> None:
    """``path`` and everything in it to the agent's user; symbolic links themselves, never their targets."""
    os.chown(path, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), account.uid, account.gid)


def _make_agent_dir(path: Path, account: Optional[Account]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o750)
    if account is not None:
        _chown_tree(path, account)


def _write_file(path: Path, text: str, mode: int, gid: Optional[int] = None) -> None:
    """Write ``text`` with ``mode`` (and group ``gid``) set before the first byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        if gid is not None:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
        f.write(text)


class Step(NamedTuple):
    """One change ``agent install`` makes (or, on a dry run, prints)."""

    what: str
    path: Path
    do: Callable[[], None]


def _readable_steps(target: Target, cfg: AgentConfig, account: Optional[Account]) -> list[Step]:
    """Make the files the agent reads readable by it: public ones (trusted keys, CA, certificate)
    by everyone, the client key by root and the agent's group only."""
    steps = []
    public = [Path(p) for p in (*cfg.trusted_keys, cfg.ca_file, cfg.client_cert) if str(p)]
    for path in map(target.path, public):
        if path.exists() and path.stat().st_mode & 0o044 != 0o044:
            steps.append(Step("make readable", path, lambda p=path: p.chmod(p.stat().st_mode | 0o044)))
    key = target.path(Path(cfg.client_key)) if cfg.client_key else None
    if key is not None and key.exists() and account is not None:
        def restrict(p: Path = key, gid: int = account.gid) -> None:
            os.chown(p, 0, gid)
            p.chmod(0o640)
        steps.append(Step(f"make readable by group {account.group} only", key, restrict))
    return steps


def _install_steps(target: Target, cfg: AgentConfig, user: str, account: Optional[Account], unit: str) -> list[Step]:
    """The changes, in order: the agent's directories, its config, the files it reads, the unit."""
    state, sockets = target.path(cfg.state_dir), target.path(cfg.socket_path.parent)
    config, sysusers = target.path(CONFIG_PATH), target.path(SYSUSERS_PATH)
    unit_file = target.path(UNIT_DIR / UNIT_NAME)
    sysusers_line = f'u {user} - "edgesdk agent" {cfg.state_dir} {NOLOGIN}\n'
    gid = account.gid if account is not None else None
    steps = [Step("create state directory", state, lambda: _make_agent_dir(state, account))]
    if not (_under(cfg.socket_path.parent, [cfg.state_dir]) or RUNTIME_ROOT in cfg.socket_path.parent.parents):
        steps.append(Step("create socket directory", sockets, lambda: _make_agent_dir(sockets, account)))
    return steps + [
        # it may hold the broker password: readable by root and the agent's group only
        Step("write config", config, lambda: _write_file(config, cfg.to_toml(), 0o640, gid)),
        *_readable_steps(target, cfg, account),
        Step("write sysusers.d entry", sysusers, lambda: _write_file(sysusers, sysusers_line, 0o644)),
        Step("write systemd unit", unit_file, lambda: _write_file(unit_file, unit, 0o644)),
    ]


def _unreachable(paths: Iterable[Path]) -> list[Path]:
    """Directories on the way to ``paths`` that another user cannot enter. Under home directories
    only the paths themselves count: the unit binds them into an empty tmpfs."""
    blocked = []
    for path in paths:
        for d in [path] if _under(path, HOME_DIRS) else [path, *path.parents]:
            if d.is_dir() and not d.stat().st_mode & 0o001:
                blocked.append(d)
    return _outermost(blocked)


def _report(target: Target, cfg: AgentConfig, user: str, group: str, created: bool, dry_run: bool) -> None:
    """What is left for the operator: missing files, unreachable code, the next commands."""
    if not created and not dry_run:
        click.echo(f"note: user {user} does not exist yet: its files are root's until systemd (StateDirectory=) "
                   "or a new agent install gives them to it", err=True)
    missing = [str(k) for k in cfg.trusted_keys if not target.path(k).exists()]
    if missing:
        click.echo(f"note: trusted key(s) {', '.join(missing)} not found: copy your public.pem there", err=True)
    blocked = _unreachable(interpreter_paths()) if target.is_host else []
    if blocked:
        click.echo(f"warning: user {user} cannot enter {', '.join(map(str, blocked))} (the agent's Python or code): "
                   "install edgesdk where other users can read it, e.g. a venv in /opt/edgesdk", err=True)
    click.echo(f"apps using the local API ({cfg.socket_path}): usermod -aG {group} APP_USER")
    click.echo("then: systemctl daemon-reload && systemctl enable --now " + UNIT_NAME)


@agent_group.command("install")
@_config_option
@click.option("--root", type=click.Path(file_okay=False), default="/", show_default=True,
              help="Install into this tree instead of / (for images and tests).")
@click.option("--user", "user", default=DEFAULT_USER, show_default=True,
              help="The unprivileged system user the agent runs as (created when missing).")
@click.option("--dry-run", is_flag=True, help="Print what would be done, change nothing.")
def install_command(config_path: str, root: str, user: str, dry_run: bool) -> None:
    """Set a device up: the agent's own user, state dir, config and a sandboxed systemd unit."""
    if not USER_NAME.fullmatch(user):
        raise ConfigError(f"--user {user!r}: use at most 31 lower-case letters, digits, '_' and '-', "
                          "starting with a letter or '_'")
    cfg = installed_config(load_config(config_path))
    target = Target(Path(root))
    account = ensure_account(target, user, cfg.state_dir, dry_run)
    group = account.group if account is not None else user  # useradd --user-group and sysusers: the same name
    supplementary = target.existing_groups(g for d in delegate_devices(cfg.delegate) for g in d.groups)
    home_paths = [p for p in interpreter_paths() + _files_read(cfg) if _under(p, HOME_DIRS)]
    unit = render_unit(cfg, user, group, supplementary, home_paths=home_paths)
    for step in _install_steps(target, cfg, user, account, unit):
        click.echo(f"{'would ' if dry_run else ''}{step.what}: {step.path}")
        if not dry_run:
            step.do()
    _report(target, cfg, user, group, account is not None, dry_run)


def _client(cfg: Any) -> Optional[Any]:
    """A client of the running agent, or None when nothing answers on its socket."""
    from sdk.errors import InferenceError

    from .client import AgentClient

    try:
        return AgentClient(cfg.socket_path, timeout=10)
    except InferenceError:
        return None


def _state_lock(cfg: AgentConfig) -> Any:
    """The lock ``agent run`` holds on its state dir while it runs (``<state_dir>/agent.lock``)."""
    from sdk.locks import ProcessLock

    return ProcessLock(cfg.state_dir / "agent.lock")


@contextmanager
def _while_stopped(cfg: AgentConfig, config_path: str) -> Iterator[None]:
    """Change a stopped agent's state dir: under its lock (so the agent does not start in the
    middle, and nothing changes under an agent that runs but does not answer on its socket), and
    what was written given to the state dir's owner afterwards (an operator's ``sudo`` must not
    leave root's files where the agent's own user writes)."""
    from sdk.errors import InstallError

    lock = _state_lock(cfg)
    if not lock.acquire():
        raise InstallError(f"an agent runs on {cfg.state_dir} (pid {lock.holder()} holds {lock.path}) but does not "
                           f"answer on {cfg.socket_path}: check socket_path in {config_path}, and that you may use the "
                           "socket (the agent's group)")
    try:
        yield
    finally:
        lock.release()
        _give_to_owner(cfg.state_dir)


def _give_to_owner(state_dir: Path) -> None:
    """As root, hand everything under ``state_dir`` to the user owning it (when that is not root)."""
    try:
        owner = state_dir.stat()
    except OSError:
        return
    if os.geteuid() == 0 and owner.st_uid != 0:
        _chown_tree(state_dir, Account("", owner.st_uid, owner.st_gid, ""))


def _ago(at: float) -> str:
    import time

    seconds = max(0.0, time.time() - at)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{when} ({seconds:.0f} s ago)" if seconds < 120 else f"{when} ({seconds / 60:.0f} min ago)"


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
            result = client.rollback(name)
        click.echo(f"rolled {name} back to {result['version']} (was {result['previous']})")
        return
    with _while_stopped(cfg, config_path):
        store = ModelStore(cfg.state_dir)
        target, current = store.previous(name), store.active(name)
        if not target:
            raise InstallError(f"{name} has no previous version to roll back to")
        store.activate(name, target, previous=current)
    click.echo(f"{name}: active version set to {target} (was {current}); takes effect when the agent starts")


def _read_bundle(path: str) -> bytes:
    from sdk.errors import InstallError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InstallError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc


def _checks_line(result: dict[str, Any]) -> str:
    """The health check's figures, as ``deploy`` prints them."""
    line = f"health check passed: golden max error {result['golden_max_error']:.3g}, p50 {result['p50_ms']:.3f} ms"
    if result.get("previous_p50_ms"):
        line += f" (version {result['previous']}: {result['previous_p50_ms']:.3f} ms, measured alongside)"
    return f"{line} on {result['delegate']}"


@agent_group.command("deploy")
@click.argument("bundle", type=click.Path(dir_okay=False))
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the install's summary as JSON.")
def deploy_command(bundle: str, config_path: str, as_json: bool) -> None:
    """Install BUNDLE on this device without the fleet (sideload): into the running agent, which
    verifies, health-checks and swaps it exactly as a fleet update (the old version keeps serving
    when it is refused); when the agent is stopped, into its store after the same checks, served
    when it starts. The outcome is reported to the fleet when the agent next reaches it."""
    from sdk.cli import echo_json

    from .daemon import Agent

    cfg = load_config(config_path)
    raw = _read_bundle(bundle)
    client = _client(cfg)
    if client is not None:
        with client:
            result = client.deploy(raw, Path(bundle).name)
        where = "into the running agent"
    else:
        from sdk.native import native_stderr_to_log

        with _while_stopped(cfg, config_path), native_stderr_to_log(logging.getLogger("edgesdk.agent")):
            result = Agent(cfg).sideload(raw, Path(bundle).name)  # LiteRT's console lines go to the debug log
        where = "into the store (the agent is not running: it serves it when it starts)"
    result["running"] = client is not None
    if as_json:
        echo_json(result)
        return
    was = f" (was {result['previous']})" if result["previous"] else ""
    click.echo(f"installed {result['model']}@{result['version']}{was} {where}")
    click.echo(_checks_line(result))
    click.echo(result["reported"])


@agent_group.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status_command(config_path: str, as_json: bool) -> None:
    """What the agent runs (models, versions), its broker link, its outbox and the last install:
    from the running agent, else from its state dir (and it says so)."""
    from sdk.cli import echo_json

    from .daemon import stored_status

    cfg = load_config(config_path)
    client = _client(cfg)
    if client is not None:
        with client:
            status = client.status()
    else:
        status = stored_status(cfg)
    if as_json:
        echo_json(status)
        return
    for line in _status_lines(status):
        click.echo(line)


def _status_lines(s: dict[str, Any]) -> list[str]:
    running = (f"running (pid {s['pid']}, up {s['uptime_s']:.0f} s)" if s["running"]
               else f"not running (read from its state dir {s['state_dir']})")
    lines = [f"agent {s['device']}: {running}, edgesdk {s['agent_version']}, local API {s['socket']}"]
    for m in s["models"]:
        where = f" on {m['delegate']}" if m.get("delegate") else ""
        lines.append(f"  model {m['name']}: {m['active'] or 'none active'} (previous {m['previous'] or 'none'}, "
                     f"stored {', '.join(m['stored']) or 'none'}){where}")
    if not s["models"]:
        lines.append("  no models installed")
    link = s["link"]
    state = ("connected" if link["connected"] else "not connected") if link["enabled"] else \
        "off (agent run --no-mqtt)" if link["enabled"] is False else "not connected (the agent is not running)"
    lines.append(f"  broker {link['broker']}: {state}")
    pending = s["outbox"]["pending"]
    lines.append(f"  outbox: {'unknown (cannot be read)' if pending is None else pending} message(s) waiting for the "
                 f"fleet's acknowledgement (at most {s['outbox']['max']})")
    last = s["last_install"]
    if last:
        why = f": {last['reason']}" if last.get("reason") else ""
        lines.append(f"  last install: {last['model'] or '?'}@{last['version'] or '?'} {last['outcome']} "
                     f"({last['origin']}) {_ago(last['at'])}{why}")
    else:
        lines.append("  last install: none")
    return lines


def _predict_inputs(path: str, row: dict[str, Any]) -> list[Any]:
    """INPUT as the model's inputs (batch first): an image file for a model with one image input,
    else a .npy/.npz checked against the model's input shapes (:mod:`sdk.dataset`)."""
    from sdk.dataset import IMAGE_SUFFIXES, InputSpec, load_dataset, load_image

    entries = row["input_specs"]
    specs = [InputSpec.from_manifest(e, i) for i, e in enumerate(entries)]
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        if len(specs) != 1:
            from sdk.errors import DataError

            raise DataError(f"{row['name']} takes {len(specs)} inputs: give a .npz with one array per input name")
        return [load_image(path, specs[0], tuple(entries[0].get("value_range", (0.0, 1.0))))]
    return load_dataset(path, specs, what="predict input", extra="images").xs


@agent_group.command("predict")
@click.argument("model")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@_config_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also write the outputs to this .npz (by output name).")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
def predict_command(model: str, input_path: str, config_path: str, output: Optional[str], as_json: bool) -> None:
    """Run MODEL on INPUT through the running agent and print the outputs. INPUT: an .npy or .npz
    (samples batch first; a .npz by input name, or x, x0, x1...), or an image file (png, jpg, ...:
    resized to the model's input; needs Pillow, pip install 'edgesdk[images]')."""
    import numpy as np

    from sdk.cli import echo_json
    from sdk.errors import InferenceError

    cfg = load_config(config_path)
    client = _client(cfg)
    if client is None:
        raise InferenceError(f"the agent is not running (nothing answers on {cfg.socket_path}): start it "
                             f"(edgesdk agent run --config {config_path}, or systemctl start {UNIT_NAME})")
    with client:
        row = next((r for r in client.models() if r["name"] == model and r["active"]), None)
        if row is None:
            raise InferenceError(f"no model named {model!r} is active on the agent: see edgesdk agent status")
        xs = _predict_inputs(input_path, row)
        per_sample = [client.predict(model, [x[i : i + 1] for x in xs]) for i in range(len(xs[0]))]
    outputs = {name: np.concatenate([ys[k] for ys in per_sample]) for k, name in enumerate(row["outputs"])}
    if output:
        np.savez(output, **outputs)
    if as_json:
        echo_json({"model": model, "version": row["active"], "samples": len(xs[0]),
                   "outputs": [{"name": n, "dtype": str(y.dtype), "shape": list(y.shape), "values": y.tolist()}
                               for n, y in outputs.items()]})
        return
    click.echo(f"{model}@{row['active']}, {len(xs[0])} sample(s):")
    for name, y in outputs.items():
        click.echo(f"  {name} {y.dtype} {list(y.shape)}")
        click.echo("  " + np.array2string(y, precision=6, max_line_width=100, prefix="  "))
