"""What every role's command line shares: the one error boundary, JSON output, and the commands
of the shared foundation (``keys``, ``bundle``, ``runtime``).

Errors from edgesdk print one line (``error: ...``) and exit with the error kind's code (see
:mod:`sdk.errors`); ``--debug`` (or ``EDGESDK_DEBUG=1``) shows the traceback instead. The root
``edgesdk`` group lives in :mod:`edgesdk.cli`, above every role: it attaches these groups and
the converter's, agent's and fleet's commands (lazily). Nothing here imports a package above
``sdk``; heavy imports happen only when a command runs.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import click

from .errors import EdgeSdkError

__all__ = ["CliError", "EdgeGroup", "echo_json", "keys_group", "bundle_group", "runtime_group"]


class CliError(click.ClickException):
    """An EdgeSdkError as the CLI shows it: one line, the error kind's exit code."""

    def __init__(self, err: EdgeSdkError) -> None:
        super().__init__(str(err))
        self.exit_code = err.exit_code

    def format_message(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class EdgeGroup(click.Group):
    """Translates EdgeSdkError into a one-line error at the single CLI boundary."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeSdkError as err:
            if (ctx.obj or {}).get("debug"):
                raise
            raise CliError(err) from err


def echo_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (numpy scalars and paths are converted)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# --- keys ------------------------------------------------------------------------------------
@click.group("keys")
def keys_group() -> None:
    """Ed25519 signing keys for bundles."""


@keys_group.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace existing keys in DIRECTORY.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def keys_generate(directory: str, force: bool, as_json: bool) -> None:
    """Write DIRECTORY/private.pem (keep it on the build machine) and DIRECTORY/public.pem
    (install it on devices as a trusted key)."""
    from .signing import generate_keys, key_id, load_public_key

    private, public = generate_keys(directory, overwrite=force)
    kid = key_id(load_public_key(public))
    if as_json:
        echo_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
    else:
        click.echo(f"wrote {private} (private, mode 600) and {public} (public); key id {kid}")


# --- bundle ----------------------------------------------------------------------------------
@click.group("bundle")
def bundle_group() -> None:
    """Inspect, verify and sign .edgebundle files."""


@bundle_group.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def bundle_inspect(path: str, as_json: bool) -> None:
    """Show what a bundle holds (does not check the signature: use verify)."""
    from .bundle import Bundle

    b = Bundle.open(path)
    info = b.describe()
    if as_json:
        echo_json(info)
        return
    m = b.manifest
    q = m.quantization
    click.echo(f"{m.model_id}  target {m.target}  quantization {q.get('label', q.get('recipe'))}  created {m.data['created_at']}")
    click.echo(f"bundle {info['bundle_bytes']} bytes, sha256 {info['bundle_sha256'][:16]}…, "
               + (f"signed by key {b.signer_id}" if b.signed else "UNSIGNED"))
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            qd = f" scale {t['scale']:.6g} zero_point {t['zero_point']}" if t.get("scale") else ""
            click.echo(f"  {kind} {t['name']}: {t['dtype']} {t['shape']}{qd}")
    for name, f in m.files.items():
        click.echo(f"  file {name}: {f['size']} bytes sha256 {f['sha256'][:16]}…")
    ops = ", ".join(f"{o['op']}v{o['version']}x{o['count']}" for o in m.ops)
    click.echo(f"  ops: {ops}")
    click.echo(f"  min runtime version: {m.min_runtime_version}")
    rep = m.report or {}
    if rep.get("latency"):
        acc = rep.get("accuracy", {})
        click.echo(f"  measured: p50 {rep['latency']['p50_ms']:.3f} ms, p99 {rep['latency']['p99_ms']:.3f} ms, "
                   f"{acc.get('metric')} drop {acc.get('drop_pts', 0):.2f} pts")


@bundle_group.command("verify")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--public-key", "public_keys", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Trusted public key (PEM); repeat for several.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bundle_verify(path: str, public_keys: tuple[str, ...], as_json: bool) -> None:
    """Exit 0 only if the bundle is intact and signed by one of the trusted keys."""
    from .bundle import Bundle
    from .signing import load_public_keys

    b = Bundle.open(path).verify(load_public_keys(public_keys))
    if as_json:
        echo_json({"path": path, "valid": True, "model": b.manifest.model_id, "signer_key_id": b.signer_id})
    else:
        click.echo(f"OK: {b.manifest.model_id} is intact and signed by trusted key {b.signer_id}")


@bundle_group.command("sign")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Private key (PEM).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: sign in place).")
def bundle_sign(path: str, key_path: str, output: Optional[str]) -> None:
    """Sign (or re-sign) a bundle after checking every file's sha256."""
    from .bundle import Bundle
    from .signing import key_id, load_private_key

    key = load_private_key(key_path)
    out = Bundle.open(path).sign(key, output or path)
    click.echo(f"signed {out} with key {key_id(key)}")


# --- runtime ---------------------------------------------------------------------------------
@click.group("runtime")
def runtime_group() -> None:
    """The TFLite runtime and delegates on this machine."""


@runtime_group.command("check")
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--delegate", type=click.Choice(["auto", "cpu", "gpu", "edgetpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: the runtime's choice).")
@click.option("--gpu-delegate-path", type=click.Path(dir_okay=False), help="External GPU delegate library.")
@click.option("--edgetpu-device", help="Edge TPU device, as in pycoral: usb, usb:0, pci, pci:0.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def runtime_check(model: str, delegate: str, threads: Optional[int], gpu_delegate_path: Optional[str],
                  edgetpu_device: Optional[str], as_json: bool) -> None:
    """Load MODEL (.tflite or .edgebundle) and say which runtime and delegate actually run it."""
    from .bundle import Bundle
    from .runtime import DelegateOptions, open_engine

    if model.endswith(".edgebundle"):
        data = Bundle.open(model).model_bytes(edgetpu=delegate in ("edgetpu", "auto"))
    else:
        with open(model, "rb") as fh:
            data = fh.read()
    engine = open_engine(data, delegate, DelegateOptions(threads, gpu_delegate_path, edgetpu_device=edgetpu_device))
    info = engine.describe()
    if as_json:
        echo_json(info)
        return
    rt = info["runtime"]
    click.echo(f"runtime {rt['name']} {rt['version']} (TFLite ops of {rt['tflite_version']}); running on: {info['delegate']}")
    for f in info["fallbacks"]:
        click.echo(f"  fell back from {f}")
