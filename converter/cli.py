"""``edgesdk convert``: the command-line face of :func:`converter.convert`."""

from __future__ import annotations

import sys
from typing import Any, Optional

import click

from sdk.errors import AccuracyBudgetExceeded, ConfigError

from .options import DISTILL_ALPHA, DISTILL_EPOCHS, DISTILL_TEMPERATURE

__all__ = ["convert_command"]

TARGETS = ("cpu", "gpu", "edgetpu")
QUANTIZE = ("none", "dynamic", "float16", "int8", "int16x8", "auto")


def _range(value: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise ConfigError(f"--image-range {value!r}: give LOW,HIGH such as 0,1 or -1,1") from exc
    return low, high


def _shapes(values: tuple[str, ...]) -> Optional[dict[str, tuple[int, ...]]]:
    """``NAME=1,43844,1`` options as {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError(value)
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError as exc:
            raise ConfigError(f"--input-shape {value!r}: give NAME=D0,D1,... such as input_2=1,43844,1") from exc
    return shapes or None


def _normalizations(values: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """``[NAME=]SCALE,OFFSET`` options as {name: Normalization} (``""``: every float input)."""
    from sdk.encoding import Normalization

    out: dict[str, Any] = {}
    for value in values:
        name, sep, pair = value.rpartition("=")
        out[name if sep else ""] = Normalization.parse(pair)
    return out or None


@click.command("convert")
@click.argument("model", type=click.Path())
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="Device class: cpu (XNNPACK), gpu (GPU delegate, float16), edgetpu (full integer).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Bundle to write (default NAME.edgebundle).")
@click.option("--quantize", type=click.Choice(QUANTIZE),
              help="Recipe; default per target: gpu float16, edgetpu int8, cpu int8 with --calibration else dynamic. "
                   "auto tries the target's recipes and keeps the best within --max-accuracy-drop.")
@click.option("--io-dtype", type=click.Choice(["int8", "uint8", "float32"]),
              help="Model input/output type for int8 (default int8; uint8 for edgetpu).")
@click.option("--calibration", type=click.Path(), help="Representative data: .npz (x[, y]), .npy or an image folder.")
@click.option("--eval", "eval_data", type=click.Path(), help="Evaluation data: .npz with labels y for accuracy; "
              "without labels, agreement with the original model is measured.")
@click.option("--max-accuracy-drop", type=float, help="Budget in points (auto default: 1.0). A fixed recipe over it fails.")
@click.option("--optimize", type=click.Choice(["latency", "size"]), default="latency", show_default=True,
              help="What auto optimizes among recipes within the budget.")
@click.option("--prune", type=float, help="Magnitude-prune conv/dense kernels to this sparsity (0-1).")
@click.option("--train", type=click.Path(), help="Labelled data to fine-tune the pruned model on, or to distil on.")
@click.option("--epochs", type=int, default=0, show_default=True,
              help=f"Fine-tuning epochs after pruning; distillation epochs (0: {DISTILL_EPOCHS}).")
@click.option("--distill-into", "distill_into", type=click.Path(dir_okay=False), metavar="STUDENT",
              help="Distil MODEL (the teacher, Keras) into this Keras student model file (trained or not) on --train, "
                   "then convert the student.")
@click.option("--temperature", type=float, default=DISTILL_TEMPERATURE, show_default=True,
              help="Distillation: softmax temperature of teacher and student outputs.")
@click.option("--alpha", type=float, default=DISTILL_ALPHA, show_default=True,
              help="Distillation: weight of the labels' loss (the teacher's soft targets get 1 - alpha).")
@click.option("--compare-alone", is_flag=True,
              help="Distillation: also train the same student on the labels alone and report both accuracies.")
@click.option("--threads", type=int, help="CPU threads for latency measurement (default min(4, cores)).")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per recipe (after --warmup).")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--name", help="Model name in the manifest (default: the model file's stem).")
@click.option("--model-version", default="1", show_default=True, help="Version recorded in the manifest.")
@click.option("--key", type=click.Path(dir_okay=False), help="Ed25519 private key (PEM) to sign the bundle.")
@click.option("--report-dir", type=click.Path(file_okay=False), help="Also write report.json and conversion.png here.")
@click.option("--calibration-limit", type=int, default=300, show_default=True)
@click.option("--eval-limit", type=int, default=1000, show_default=True)
@click.option("--image-range", default="0,1", show_default=True, help="Value range image pixels are scaled to.")
@click.option("--latency-limit-ms", type=float, help="p50 limit the agent's install health check enforces.")
@click.option("--signature", help="SavedModel signature to convert (default serving_default).")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=D0,D1,...",
              help="Fix an input's unknown dimensions, batch first (e.g. input_2=1,43844,1); repeat per input. "
                   "Default: an unknown batch stays dynamic for --target cpu (measured at 1), else is 1; any "
                   "other unknown dimension is an error naming it.")
@click.option("--channels-last", is_flag=True, help="PyTorch (.pt2): take NHWC inputs (the model is wrapped to permute "
              "them to its NCHW); default: the model's own layout.")
@click.option("--input-normalization", "input_normalization", multiple=True, metavar="[NAME=]SCALE,OFFSET",
              help="Record that a uint8 image becomes the model's input as x * SCALE + OFFSET (1/255,0 for [0, 1]; "
                   "2/255,-1 for [-1, 1]): devices then take uint8 images and normalise them. Without NAME: every "
                   "float input; repeat per input. uint8 data and image folders are normalised the same way here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def convert_command(model: str, target: str, output: Optional[str], quantize: Optional[str], io_dtype: Optional[str],
                    calibration: Optional[str], eval_data: Optional[str], max_accuracy_drop: Optional[float],
                    optimize: str, prune: Optional[float], train: Optional[str], epochs: int, threads: Optional[int],
                    runs: int, warmup: int, name: Optional[str], model_version: str, key: Optional[str],
                    report_dir: Optional[str], calibration_limit: int, eval_limit: int, image_range: str,
                    latency_limit_ms: Optional[float], signature: Optional[str], input_shape: tuple[str, ...],
                    channels_last: bool, distill_into: Optional[str], temperature: float, alpha: float,
                    compare_alone: bool, input_normalization: tuple[str, ...], as_json: bool) -> None:
    """Convert MODEL (.keras, .h5, SavedModel dir, .tflite or PyTorch .pt2) into a measured, signed bundle."""
    from converter import convert
    from sdk.cli import echo_json

    with click.progressbar(length=1, label="converting", file=sys.stderr, show_eta=False) as bar:
        def progress(label: str, done: int, total: int) -> None:
            bar.length = total
            bar.label = f"{label:<34}"
            bar.update(done - bar.pos)

        kwargs: dict[str, Any] = dict(
            target=target, output=output, quantize=quantize, io_dtype=io_dtype, calibration=calibration,
            eval_data=eval_data, max_accuracy_drop=max_accuracy_drop, optimize=optimize, prune=prune, train=train,
            epochs=epochs, threads=threads, runs=runs, warmup=warmup, name=name, version=model_version, key=key,
            report_dir=report_dir, calibration_limit=calibration_limit, eval_limit=eval_limit,
            image_range=_range(image_range), latency_limit_ms=latency_limit_ms, progress=progress,
            signature=signature, input_shapes=_shapes(input_shape), channels_last=channels_last,
            distill_into=distill_into, temperature=temperature, alpha=alpha, compare_alone=compare_alone,
            input_normalization=_normalizations(input_normalization),
        )
        try:
            result = convert(model, **kwargs)
        except AccuracyBudgetExceeded as err:
            if err.report is not None:
                from converter.report import render_table

                bar.render_finish()
                if as_json:
                    echo_json({"error": str(err), "report": err.report})
                else:
                    click.echo(render_table(err.report), err=True)
            raise
    if as_json:
        echo_json(result.report)
    else:
        click.echo(result.table())
        signed = "signed" if result.report["bundle"]["signed"] else "UNSIGNED (pass --key to sign)"
        click.echo(f"wrote {result.bundle_path} ({result.report['bundle']['bytes'] / 1024:.1f} KB, {signed})")
