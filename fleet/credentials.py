"""Per-device credentials for a locked-down Mosquitto: a fleet CA, client certificates, a CRL and
the broker configuration that enforces them (``edgesdk fleet credentials ...`` is a thin layer
over :class:`CredentialsStore`).

Every client of the broker presents a certificate signed by the fleet CA. Mosquitto takes the
certificate's CN as the username (``use_identity_as_username``) and the ACL file limits each
username to its own topics: a device (CN = device id) may only write its own ``status``,
``heartbeat`` and ``up`` and read its own ``cmd``, ``chunk``, ``task`` and the fleet's presence;
the fleet (CN = :data:`FLEET_IDENTITY`) reads every device's telemetry and writes every device's
commands. ``use_username_as_clientid`` makes the client id the CN as well, so no client can take
over (and so disconnect) another's session. A stolen device's key therefore speaks only for that
device, and revoking it (the CRL) shuts it out once the broker re-reads the CRL: at start, and
(Mosquitto 2.0.11, tested) on SIGHUP for new connections; a restart also closes the open one.
docs/security.md is the operator's guide.

The credentials directory (default ``<fleet state dir>/credentials``; directories 0700, private
keys 0600)::

    ca.pem, ca.key          the fleet CA (EC P-256); ca.key stays here
    index.json              every certificate issued: identity, serial, expiry, revocation
    broker/                 what the broker reads (copy it to the broker host)
        edgesdk.conf        the TLS listener, CRL, allow_anonymous false, acl_file
        acl                 the topic rules (see :func:`acl_text`)
        ca.pem, crl.pem, server.pem, server.key
    fleet/                  the fleet controller's client certificate (CN ``edgesdk-fleet``)
        ca.pem, client.pem, client.key
    devices/<id>/           one per device: copy to the device
        ca.pem, client.pem, client.key, agent.toml (the agent config lines that use them)

EC P-256 keys and ECDSA-SHA256 signatures: what Mosquitto 2.0 with OpenSSL 3 and Python's ``ssl``
accept everywhere (Ed25519 TLS certificates are not supported by every client library).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdk import protocol as proto
from sdk.errors import ConfigError, NotFoundError
from sdk.paths import SAFE_NAME, confined

__all__ = [
    "FLEET_IDENTITY",
    "BROKER_IDENTITY",
    "DEFAULT_PORT",
    "DEVICE_WRITES",
    "DEVICE_READS",
    "CredentialsStore",
    "IssuedCertificate",
    "DeviceCredentials",
    "FleetCredentials",
    "BrokerFiles",
    "acl_text",
    "broker_config_text",
    "default_credentials_dir",
    "check_device_id",
]

PathLike = Union[str, "os.PathLike[str]"]

#: the CN of the fleet controller's certificate, i.e. its username on the broker
FLEET_IDENTITY = "edgesdk-fleet"
#: the CN of the broker's server certificate
BROKER_IDENTITY = "edgesdk-broker"
DEFAULT_PORT = 8883
#: channels a device publishes on (its own only) and the fleet reads (every device's)
DEVICE_WRITES = ("status", "heartbeat", "up")
#: channels the fleet publishes on (every device's) and a device reads (its own only)
DEVICE_READS = ("cmd", "chunk", "task")
CA_DAYS = 3650
CERT_DAYS = 1825
_SKEW = datetime.timedelta(minutes=5)  # not_valid_before in the past: clocks on devices drift


def default_credentials_dir(state_dir: Optional[PathLike] = None) -> Path:
    """``<state_dir>/credentials``; the fleet's default state directory when none is given."""
    from .storage import default_state_dir

    base = Path(os.path.expanduser(str(state_dir))) if state_dir else default_state_dir()
    return base / "credentials"


def check_device_id(device: str) -> str:
    """``device`` if it can be a device's certificate CN; :class:`ConfigError` otherwise.

    The CN becomes the broker username and the ``%u`` in the ACL's topic patterns, so it must be
    a protocol id (:data:`sdk.paths.SAFE_NAME`) and must not be the fleet's own identity.
    """
    if not isinstance(device, str) or not SAFE_NAME.fullmatch(device):
        raise ConfigError(f"device id {device!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (the protocol's id pattern)")
    if device == FLEET_IDENTITY:
        raise ConfigError(f"device id {device!r} is the fleet's own identity: choose another id")
    return device


# --- the broker's configuration ------------------------------------------------------------------
def acl_text(fleet_identity: str = FLEET_IDENTITY) -> str:
    """The Mosquitto ACL file. ``pattern`` lines apply to every user (``%u`` = the username = the
    certificate CN); the ``user`` block applies to the fleet alone; anything not allowed is denied."""
    lines = [
        "# edgesdk ACL, written by `edgesdk fleet credentials init`. Mosquitto denies whatever no line allows.",
        "# %u is the username: with use_identity_as_username, the client certificate's CN (the device id).",
        "",
        "# every client, for its own device id: publish its presence, telemetry and outbox ...",
        *(f"pattern write {proto.topic_pattern(ch, '%u')}" for ch in DEVICE_WRITES),
        "# ... receive its commands, bundle chunks and batch tasks ...",
        *(f"pattern read {proto.topic_pattern(ch, '%u')}" for ch in DEVICE_READS),
        "# ... and see the fleet's presence (Mosquitto warns that this pattern has no %u: it is meant for all)",
        f"pattern read {proto.fleet_topic()}",
        "",
        "# the fleet controller: every device's presence, telemetry and outbox in; commands, chunks, tasks out",
        f"user {fleet_identity}",
        *(f"topic read {proto.subscription(ch)}" for ch in DEVICE_WRITES),
        *(f"topic write {proto.subscription(ch)}" for ch in DEVICE_READS),
        f"topic readwrite {proto.fleet_topic()}",
    ]
    return "\n".join(lines) + "\n"


def broker_config_text(files: "BrokerFiles", files_dir: Optional[PathLike] = None) -> str:
    """The Mosquitto configuration piece: one TLS listener that requires a certificate from the
    fleet CA, checks the CRL, maps the CN to the username, and the ACL. ``files_dir`` is where the
    broker reads the files (default: where they were written)."""
    where = Path(files_dir) if files_dir else files.directory

    def path(p: Path) -> str:
        return str(where / p.name)

    bind = f" {files.bind}" if files.bind else ""
    return "\n".join([
        "# edgesdk: a locked-down Mosquitto listener, written by `edgesdk fleet credentials init`.",
        "# Every client presents a certificate from the fleet CA; its CN is the username the ACL checks.",
        "# Mosquitto reads the CRL at start and on SIGHUP (new connections only): after",
        "# `edgesdk fleet credentials revoke`, restart it to close the revoked device's open connection too.",
        f"listener {files.port}{bind}",
        f"cafile {path(files.ca_file)}",
        f"certfile {path(files.certfile)}",
        f"keyfile {path(files.keyfile)}",
        f"crlfile {path(files.crlfile)}",
        "require_certificate true",
        "use_identity_as_username true",
        "# the client id becomes the CN too: no client can take over (and disconnect) another's session",
        "use_username_as_clientid true",
        "# TLS 1.2 or 1.3",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        f"acl_file {path(files.acl)}",
        "",
    ])


# --- what the store hands out ----------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedCertificate:
    """One certificate the CA signed (a row of ``index.json``)."""

    identity: str  # the CN
    kind: str  # "device" | "fleet" | "broker"
    serial: int
    not_after: str  # ISO 8601, UTC
    revoked_at: Optional[str] = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "serial": f"{self.serial:x}", "revoked": self.revoked}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IssuedCertificate":
        return cls(data["identity"], data["kind"], int(data["serial"], 16), data["not_after"], data.get("revoked_at"))


@dataclass(frozen=True)
class BrokerFiles:
    """The files a broker needs, all in ``directory``, and the listener they configure."""

    directory: Path
    port: int
    bind: str = ""
    hosts: tuple[str, ...] = ()

    @property
    def config(self) -> Path:
        return self.directory / "edgesdk.conf"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def certfile(self) -> Path:
        return self.directory / "server.pem"

    @property
    def keyfile(self) -> Path:
        return self.directory / "server.key"

    @property
    def crlfile(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def url(self) -> str:
        """``mqtts://HOST:PORT`` with the first broker host (else the bind address, else localhost)."""
        host = self.hosts[0] if self.hosts else self.bind or "localhost"
        return f"mqtts://{_url_host(host)}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "config": str(self.config), "acl": str(self.acl),
                "ca_file": str(self.ca_file), "certfile": str(self.certfile), "keyfile": str(self.keyfile),
                "crlfile": str(self.crlfile), "port": self.port, "bind": self.bind, "hosts": list(self.hosts),
                "url": self.url}


@dataclass(frozen=True)
class FleetCredentials:
    """The fleet controller's own client certificate and how to pass it to ``edgesdk fleet``."""

    broker_url: str
    ca_file: Path
    client_cert: Path
    client_key: Path

    def mqtt_options(self) -> dict[str, str]:
        """Keyword arguments for :class:`fleet.Fleet` (and :class:`sdk.mqtt.MqttSettings`)."""
        return {"ca_file": str(self.ca_file), "client_cert": str(self.client_cert), "client_key": str(self.client_key)}

    def cli_options(self) -> list[str]:
        """The ``edgesdk fleet`` options, e.g. ``edgesdk fleet <these> serve``."""
        return ["--broker", self.broker_url, "--ca-file", str(self.ca_file), "--client-cert", str(self.client_cert),
                "--client-key", str(self.client_key)]

    def environment(self) -> dict[str, str]:
        """The same as ``EDGESDK_FLEET_*`` environment variables (for a systemd unit or a shell)."""
        return {"EDGESDK_FLEET_BROKER": self.broker_url, "EDGESDK_FLEET_CA_FILE": str(self.ca_file),
                "EDGESDK_FLEET_CLIENT_CERT": str(self.client_cert), "EDGESDK_FLEET_CLIENT_KEY": str(self.client_key)}

    def to_dict(self) -> dict[str, Any]:
        return {"broker_url": self.broker_url, **self.mqtt_options(), "identity": FLEET_IDENTITY,
                "cli_options": self.cli_options(), "environment": self.environment()}


@dataclass(frozen=True)
class DeviceCredentials:
    """What ``issue`` wrote for one device: its files and the agent config lines that use them."""

    device: str
    directory: Path
    serial: int
    broker_url: str
    install_dir: Path  # where the agent config lines say the files are (on the device)
    replaced: tuple[int, ...] = field(default=())  # serials revoked because this one replaced them

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def agent_config(self) -> Path:
        return self.directory / "agent.toml"

    def config_values(self) -> dict[str, str]:
        """The agent configuration keys (:class:`agent.config.AgentConfig`) these credentials set."""
        return {"device_id": self.device, "broker_url": self.broker_url,
                "ca_file": str(self.install_dir / self.ca_file.name),
                "client_cert": str(self.install_dir / self.client_cert.name),
                "client_key": str(self.install_dir / self.client_key.name)}

    def config_lines(self) -> str:
        """The same as TOML lines for ``agent.toml`` (what ``agent.toml`` in the device's directory holds)."""
        head = (f"# edgesdk agent: broker credentials of device {self.device} "
                f"(certificate serial {self.serial:x}); merge into /etc/edgesdk/agent.toml\n")
        return head + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.config_values().items())

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "directory": str(self.directory), "serial": f"{self.serial:x}",
                "ca_file": str(self.ca_file), "client_cert": str(self.client_cert), "client_key": str(self.client_key),
                "agent_config": str(self.agent_config), "config": self.config_values(),
                "replaced": [f"{s:x}" for s in self.replaced]}


# --- files -------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte on (never readable wider), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # os.open's mode is masked by the umask
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; check the directory's permissions") from exc


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)


def _write_pem(path: Path, obj: Union[x509.Certificate, x509.CertificateRevocationList]) -> None:
    _write_atomic(path, obj.public_bytes(serialization.Encoding.PEM), 0o644)


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}; check the parent's permissions") from exc
    return path


# --- certificates ------------------------------------------------------------------------------
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _expiry(cert: x509.Certificate) -> datetime.datetime:
    """``not_valid_after`` as an aware UTC datetime (``not_valid_after_utc`` exists from cryptography 42 on)."""
    aware = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgesdk fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise ConfigError(f"broker host {host!r}: give a DNS name or an IP address") from None
            try:
                names.append(x509.DNSName(host))
            except ValueError as exc:  # not ASCII (an IDN): cryptography wants the A-label
                raise ConfigError(f"broker host {host!r}: {exc}; give the ASCII (punycode) form") from exc
    return x509.SubjectAlternativeName(names)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = _now()
    name = _name("edgesdk fleet CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))


def _leaf(cn: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          *, server: bool, days: int, hosts: Sequence[str] = ()) -> x509.Certificate:
    """A server (TLS serverAuth, SAN = the broker's names) or client (clientAuth) certificate."""
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), _expiry(ca_cert))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - _SKEW).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, revoked: Iterable[IssuedCertificate],
         number: int) -> x509.CertificateRevocationList:
    """The CRL: valid until the CA expires (OpenSSL refuses every client once a CRL is past its
    next update, so a short-lived CRL would need re-signing on a timer)."""
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - _SKEW).next_update(_expiry(ca_cert))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    for cert in revoked:
        at = datetime.datetime.fromisoformat(cert.revoked_at or now.isoformat())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial).revocation_date(at).build())
    return builder.sign(ca_key, hashes.SHA256())


# --- the store ------------------------------------------------------------------------------------
class CredentialsStore:
    """The fleet CA and everything it issued, in one directory (see the module docstring).

    ``init`` once; then ``issue`` per device and ``revoke`` when a device is lost. Every method
    raises :class:`~sdk.errors.ConfigError` (bad input, not initialised) or
    :class:`~sdk.errors.NotFoundError` (no certificate for that device), with one line to act on.
    """

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(os.path.expanduser(str(directory))).absolute()

    # paths
    @property
    def ca_cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def index_path(self) -> Path:
        return self.directory / "index.json"

    @property
    def devices_dir(self) -> Path:
        return self.directory / "devices"

    @property
    def fleet_dir(self) -> Path:
        return self.directory / "fleet"

    def initialized(self) -> bool:
        return self.ca_key_path.exists() and self.index_path.exists()

    # --- init ------------------------------------------------------------------------------
    def init(self, *, broker_hosts: Sequence[str] = (), port: int = DEFAULT_PORT, bind: str = "",
             broker_files_dir: Optional[PathLike] = None, days: int = CA_DAYS, force: bool = False) -> BrokerFiles:
        """Create the CA, the broker's server certificate (SAN 127.0.0.1, localhost and
        ``broker_hosts``), the fleet's client certificate, an empty CRL, the ACL and the broker
        configuration. ``broker_files_dir``: where the broker host will keep ``broker/`` (the paths
        written into ``edgesdk.conf``). Refuses to replace an existing CA unless ``force``."""
        if self.initialized() and not force:
            raise ConfigError(f"{self.directory} already holds a fleet CA: use it (issue, revoke), or pass --force "
                              "to replace it (every certificate issued so far stops working)")
        if not 0 < port < 65536:
            raise ConfigError(f"port {port}: choose 1-65535 (MQTT over TLS is usually 8883)")
        if bind:
            _san([bind])  # the same check as a host name
        files = BrokerFiles(self.directory / "broker", port, bind, tuple(broker_hosts))
        _san(files.hosts)  # check the host names before writing anything
        _private_dir(self.directory)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _self_signed_ca(ca_key, days)
        _write_key(self.ca_key_path, ca_key)
        _write_pem(self.ca_cert_path, ca_cert)
        index: dict[str, Any] = {"broker": {"port": port, "bind": bind, "hosts": list(files.hosts),
                                            "files_dir": str(broker_files_dir or "")},
                                 "crl_number": 0, "certificates": []}
        self._write_broker(files, ca_cert, ca_key, index, broker_files_dir)
        self._write_fleet(files, ca_cert, ca_key, index)
        self._save_index(index)
        self._write_crl(index, ca_cert, ca_key)
        return files

    def _write_broker(self, files: BrokerFiles, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      index: dict[str, Any], files_dir: Optional[PathLike]) -> None:
        _private_dir(files.directory)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(BROKER_IDENTITY, key, ca_cert, ca_key, server=True, days=CERT_DAYS, hosts=files.hosts)
        _write_key(files.keyfile, key)
        _write_pem(files.certfile, cert)
        _write_pem(files.ca_file, ca_cert)
        _write_atomic(files.acl, acl_text().encode(), 0o644)
        _write_atomic(files.config, broker_config_text(files, files_dir).encode(), 0o644)
        index["certificates"].append(self._record(BROKER_IDENTITY, "broker", cert).to_dict())

    def _write_fleet(self, files: BrokerFiles, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     index: dict[str, Any]) -> None:
        _private_dir(self.fleet_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(FLEET_IDENTITY, key, ca_cert, ca_key, server=False, days=CERT_DAYS)
        _write_key(self.fleet_dir / "client.key", key)
        _write_pem(self.fleet_dir / "client.pem", cert)
        _write_pem(self.fleet_dir / "ca.pem", ca_cert)
        index["certificates"].append(self._record(FLEET_IDENTITY, "fleet", cert).to_dict())

    # --- issue / revoke ----------------------------------------------------------------------------
    def issue(self, *devices: str, broker_url: Optional[str] = None, install_dir: Optional[PathLike] = None,
              replace: bool = False, days: int = CERT_DAYS) -> list[DeviceCredentials]:
        """Write ``devices/<device>/`` for each device: a client certificate (CN = the device id)
        and key, the CA file and ``agent.toml`` with the agent config lines. ``install_dir``: where
        the files will be on the device (default: where they are written). A device that already
        holds a valid certificate keeps it unless ``replace`` (then the old one is revoked). Every
        id is checked before anything is written."""
        index = self._load_index()
        active = {d: self._active(index, d) for d in self._checked(devices)}
        taken = [d for d, certs in active.items() if certs and not replace]
        if taken:
            raise ConfigError(f"a certificate is already issued to {', '.join(taken)}: pass --replace to issue a new "
                              "one and revoke the old, or revoke first")
        ca_cert, ca_key = self._load_ca()
        _private_dir(self.devices_dir)
        url = broker_url or self.broker().url
        issued = [self._issue_one(d, ca_cert, ca_key, url, install_dir, days, active[d], index) for d in active]
        self._save_index(index)
        if any(c.replaced for c in issued):
            self._write_crl(index, ca_cert, ca_key)
        return issued

    def _issue_one(self, device: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, broker_url: str,
                   install_dir: Optional[PathLike], days: int, replaced: list[IssuedCertificate],
                   index: dict[str, Any]) -> DeviceCredentials:
        directory = _private_dir(confined(self.devices_dir, device))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(device, key, ca_cert, ca_key, server=False, days=days)
        creds = DeviceCredentials(device, directory, cert.serial_number, broker_url,
                                  Path(install_dir) if install_dir else directory, tuple(c.serial for c in replaced))
        _write_key(creds.client_key, key)
        _write_pem(creds.client_cert, cert)
        _write_pem(creds.ca_file, ca_cert)
        _write_atomic(creds.agent_config, creds.config_lines().encode(), 0o644)
        self._mark_revoked(index, creds.replaced)
        index["certificates"].append(self._record(device, "device", cert).to_dict())
        return creds

    def revoke(self, *devices: str) -> dict[str, list[IssuedCertificate]]:
        """Add every certificate of each device to the CRL and rewrite ``broker/crl.pem``; returns,
        per device, the certificates newly revoked (empty if all already were). The broker refuses
        a revoked device once it has re-read the CRL: Mosquitto reads it at start and, 2.0.11
        tested, on SIGHUP; a connection already open stays open until the broker restarts."""
        index = self._load_index()
        checked = self._checked(devices)
        unknown = [d for d in checked if not any(c.identity == d and c.kind == "device" for c in self._certificates(index))]
        if unknown:
            raise NotFoundError(f"no certificate was issued to {', '.join(unknown)} in {self.directory}: "
                                "see edgesdk fleet credentials show")
        fresh = {d: self._active(index, d) for d in checked}
        self._mark_revoked(index, [c.serial for certs in fresh.values() for c in certs])
        self._write_crl(index, *self._load_ca())
        now_revoked = {c.serial: c for c in self._certificates(index)}
        return {d: [now_revoked[c.serial] for c in certs] for d, certs in fresh.items()}

    # --- what exists ---------------------------------------------------------------------------------
    def certificates(self) -> list[IssuedCertificate]:
        """Every certificate issued, in order (broker, fleet, then devices as issued)."""
        return self._certificates(self._load_index())

    def broker(self) -> BrokerFiles:
        """The broker's files and listener as ``init`` wrote them."""
        b = self._load_index()["broker"]
        return BrokerFiles(self.directory / "broker", int(b["port"]), b.get("bind", ""), tuple(b.get("hosts", ())))

    def fleet(self, broker_url: Optional[str] = None) -> FleetCredentials:
        """The fleet controller's credentials (CN :data:`FLEET_IDENTITY`)."""
        self._load_index()
        return FleetCredentials(broker_url or self.broker().url, self.fleet_dir / "ca.pem",
                                self.fleet_dir / "client.pem", self.fleet_dir / "client.key")

    # --- internals ------------------------------------------------------------------------------------
    @staticmethod
    def _record(identity: str, kind: str, cert: x509.Certificate) -> IssuedCertificate:
        return IssuedCertificate(identity, kind, cert.serial_number, _expiry(cert).isoformat())

    @staticmethod
    def _checked(devices: Sequence[str]) -> list[str]:
        if not devices:
            raise ConfigError("name at least one device id")
        return list(dict.fromkeys(check_device_id(d) for d in devices))

    def _active(self, index: dict[str, Any], device: str) -> list[IssuedCertificate]:
        return [c for c in self._certificates(index) if c.identity == device and c.kind == "device" and not c.revoked]

    @staticmethod
    def _certificates(index: dict[str, Any]) -> list[IssuedCertificate]:
        return [IssuedCertificate.from_dict(c) for c in index["certificates"]]

    @staticmethod
    def _mark_revoked(index: dict[str, Any], serials: Iterable[int]) -> None:
        wanted = {f"{s:x}" for s in serials}
        at = _now().isoformat()
        for row in index["certificates"]:
            if row["serial"] in wanted and row.get("revoked_at") is None:
                row["revoked_at"] = at
                row["revoked"] = True

    def _load_index(self) -> dict[str, Any]:
        if not self.initialized():
            raise ConfigError(f"no fleet CA in {self.directory}: run edgesdk fleet credentials init first "
                              "(or pass --dir with the credentials directory)")
        try:
            return json.loads(self.index_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.index_path}: {exc}") from exc

    def _save_index(self, index: dict[str, Any]) -> None:
        _write_atomic(self.index_path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode(), 0o600)

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the fleet CA from {self.directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key_path} is not an EC private key: was it written by credentials init?")
        return cert, key

    def _write_crl(self, index: dict[str, Any], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        index["crl_number"] = int(index.get("crl_number", 0)) + 1
        revoked = [c for c in self._certificates(index) if c.revoked]
        _write_pem(self.directory / "broker" / "crl.pem", _crl(ca_cert, ca_key, revoked, index["crl_number"]))
        self._save_index(index)
