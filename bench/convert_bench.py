"""Conversion benchmark: every recipe's size, latency and accuracy, measured in one run.

Models: MobileNetV2 1.0/224 (``weights=None``: random weights, nothing is downloaded) and the
digits CNN (trained here on scikit-learn's bundled digits). For each, ``converter.convert`` with
``--quantize auto`` builds every CPU recipe and measures it on LiteRT (warm-up, then ``--runs``
invokes, batch 1); the float32 TFLite row is the baseline ratios are taken against, and the
Keras model's own call latency (``model(x)``, TensorFlow eager) is measured in the same run.

Quality: digits — top-1 accuracy on the 397-image test split (labels). MobileNetV2 — random
weights have no accuracy, so cosine similarity of the logits (``classifier_activation=None``:
an untrained softmax is nearly uniform and quantizes to all zeros) and top-1 agreement with the
Keras model, on 64 crops of scikit-learn's two bundled photos (also the calibration data).

    python bench/convert_bench.py [--runs 50] [--threads 2] [--models digits,mobilenetv2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def digits_model(tmp: Path) -> tuple[Path, Path, Path]:
    from converter.digits import load_digits_split, train_digits_cnn

    d = load_digits_split()
    m, _ = train_digits_cnn(d)
    m.save(tmp / "digits.keras")
    np.savez(tmp / "digits_calib.npz", x=d.x_train[:300])
    np.savez(tmp / "digits_eval.npz", x=d.x_test, y=d.y_test)
    return tmp / "digits.keras", tmp / "digits_calib.npz", tmp / "digits_eval.npz"


def mobilenet_model(tmp: Path) -> tuple[Path, Path, Path]:
    import keras
    from sklearn.datasets import load_sample_images

    keras.utils.set_random_seed(0)
    m = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=1000, classifier_activation=None)
    rng = np.random.default_rng(0)
    crops = []
    for img in load_sample_images().images:  # two real 427x640 photos shipped with scikit-learn
        h, w, _ = img.shape
        for _ in range(32):
            size = int(rng.integers(160, min(h, w)))
            top, left = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
            crop = keras.ops.image.resize(img[top : top + size, left : left + size].astype(np.float32), (224, 224))
            crops.append(np.asarray(crop) / 127.5 - 1.0)  # MobileNetV2's [-1, 1] preprocessing
    x = np.stack(crops).astype(np.float32)
    # Untrained BatchNorm statistics make the activations of a random MobileNetV2 vanish (logits
    # ~1e-11), which no quantized model can represent. Set every BatchNorm's moving statistics
    # from one training-mode pass over the crops (momentum 0): a random network with realistic
    # activation ranges, which is what quantization quality depends on.
    bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    m(x, training=True)
    for layer in bns:
        layer.momentum = 0.99
    m.save(tmp / "mobilenetv2.keras")
    np.savez(tmp / "mnv2_calib.npz", x=x)
    return tmp / "mobilenetv2.keras", tmp / "mnv2_calib.npz", tmp / "mnv2_calib.npz"


def keras_latency(path: Path, shape: tuple[int, ...], runs: int) -> dict[str, float]:
    import keras

    from sdk.latency import measure

    m = keras.models.load_model(path, compile=False)
    x = np.zeros((1, *shape), np.float32)
    return measure(lambda: m(x, training=False), warmup=3, runs=runs).to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description="edgesdk conversion benchmark")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="digits,mobilenetv2")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--keep", help="keep models and bundles in this directory")
    args = ap.parse_args()

    from converter import convert
    from sdk.runtime import find_runtime

    rt = find_runtime()
    print(f"# edgesdk convert_bench — {rt.name} {rt.version}, {args.threads} threads, batch 1, 5 warm-up then at "
          f"least {args.runs} timed runs per recipe over at least 0.5 s, recipes interleaved in blocks of 10, "
          f"{os.cpu_count()} cores\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        builders = {"digits": digits_model, "mobilenetv2": mobilenet_model}
        for name in args.models.split(","):
            t0 = time.time()
            path, calib, evald = builders[name](tmp)
            res = convert(path, target="cpu", quantize="auto", max_accuracy_drop=100.0, calibration=calib,
                          eval_data=evald, threads=args.threads, runs=args.runs, output=tmp / f"{name}.edgebundle",
                          calibration_limit=300 if name == "digits" else 64)
            shape = tuple(res.manifest.inputs[0]["shape"][1:])
            k = keras_latency(path, shape, max(10, args.runs // 5))
            results[name] = {"report": res.report, "keras_latency": k, "seconds": time.time() - t0}
            rep = res.report
            print(f"## {name} ({rep['evaluation']['samples']} eval samples, {rep['evaluation']['data'].split('/')[-1]}; "
                  f"{time.time() - t0:.0f} s)\n")
            print("| recipe | size | ratio to float32 | zipped | p50 ms | p99 ms | p50 vs float32 | quality |")
            print("|---|---|---|---|---|---|---|---|")
            base = next(c for c in rep["candidates"] if c["recipe"] == "none")
            print(f"| Keras model(x), TF eager | {rep['source']['bytes'] / 1e6:.2f} MB (.keras) | - | - | "
                  f"{k['p50_ms']:.3f} | {k['p99_ms']:.3f} | {k['p50_ms'] / base['latency']['p50_ms']:.2f}x | reference |")
            for c in rep["candidates"]:
                if c["status"] != "ok":
                    print(f"| {c['label']} | failed: {c.get('error')} | | | | | | |")
                    continue
                if c["metric"] == "accuracy":
                    q = f"acc {100 * c['accuracy']:.2f}% (float {100 * c['reference_accuracy']:.2f}%)"
                else:
                    q = f"cos {c['cosine']:.4f}, top-1 agree {100 * c['top1_agreement']:.1f}%"
                print(f"| {c['label']} | {c['size_bytes'] / 1e6:.3f} MB | {c['ratio_to_float32']:.3f} | "
                      f"{c['compressed_bytes'] / 1e6:.3f} MB | {c['latency']['p50_ms']:.3f} | {c['latency']['p99_ms']:.3f} | "
                      f"{c['latency']['p50_ms'] / base['latency']['p50_ms']:.2f}x | {q} |")
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
